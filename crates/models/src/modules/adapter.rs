//! Low-rank adapters (LoRA) on the linear and convolution layers of a network.
//!
//! A network built inside [`registering`] names each of its adaptable layers after its weight
//! path (`unet/down_blocks.0.attentions.0.proj_in`) and reports their shapes. While
//! [`with_adapters`] runs, a named layer adds to its own output the output of each adapter
//! attached to it, `y = W x + b + sum_i scale_i * up_i(down_i(x))`, as PEFT's unmerged LoRA
//! layers do. The base weights are never changed, so a job without adapters after any number of
//! jobs with them computes exactly what it computed before them.
//!
//! Both the registry and the active set are per thread: the engine builds and runs a model on
//! its own thread, and tests that run models on parallel threads do not see each other's sets.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::cpu_gemm::{takes_bf16, PackedLinear};

/// The shape of an adaptable layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerShape {
    Linear {
        din: usize,
        dout: usize,
    },
    Conv {
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    },
}

impl LayerShape {
    /// (inputs, outputs) of the layer.
    pub fn dims(self) -> (usize, usize) {
        match self {
            LayerShape::Linear { din, dout } => (din, dout),
            LayerShape::Conv { cin, cout, .. } => (cin, cout),
        }
    }
}

/// An adaptable layer of a loaded network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// The network it belongs to: `unet`, `text_encoder`, `transformer`.
    pub component: &'static str,
    /// The path of its weight without `.weight`, in the names the network was loaded with.
    pub path: String,
    pub shape: LayerShape,
}

impl LayerInfo {
    fn key(&self) -> String {
        format!("{}/{}", self.component, self.path)
    }
}

/// One adapter on one layer: `down` is (rank, in) for a linear layer and (rank, in, k, k) for a
/// convolution (applied with the layer's stride and padding); `up` is (out, rank), or
/// (out, rank, 1, 1) for a convolution.
#[derive(Debug, Clone)]
struct Adapter {
    down: Tensor,
    up: Tensor,
    scale: f64,
    /// For a convolution: the down projection as a convolution with the layer's stride and
    /// padding (the project's CPU convolution, kernel laid out once).
    conv: Option<super::conv_kernel::CpuConv2d>,
}

/// The adapters of one job, by layer.
#[derive(Debug, Clone, Default)]
pub struct AdapterSet {
    layers: HashMap<String, Vec<Adapter>>,
}

impl AdapterSet {
    /// Attaches `scale * up(down(x))` to `layer`. The shapes must fit the layer (the LoRA reader
    /// checks them and names the offending key); this checks them again.
    pub fn attach(
        &mut self,
        layer: &LayerInfo,
        down: Tensor,
        up: Tensor,
        scale: f64,
    ) -> crate::Result<()> {
        let rank = down.dim(0)?;
        let (din, dout) = layer.shape.dims();
        let (down_want, up_want) = match layer.shape {
            LayerShape::Linear { .. } => (vec![rank, din], vec![dout, rank]),
            LayerShape::Conv { k, .. } => (vec![rank, din, k, k], vec![dout, rank, 1, 1]),
        };
        if down.dims() != down_want.as_slice() || up.dims() != up_want.as_slice() {
            return Err(crate::Error::invalid(
                "lora",
                format!(
                    "adapter shapes {:?} / {:?} do not fit layer {} (expected {down_want:?} / {up_want:?})",
                    down.dims(),
                    up.dims(),
                    layer.path
                ),
            ));
        }
        let conv = match layer.shape {
            LayerShape::Linear { .. } => None,
            LayerShape::Conv {
                stride, padding, ..
            } => {
                let cfg = candle_nn::Conv2dConfig {
                    padding,
                    stride,
                    ..Default::default()
                };
                Some(super::conv_kernel::CpuConv2d::new(candle_nn::Conv2d::new(
                    down.clone(),
                    None,
                    cfg,
                ))?)
            }
        };
        self.layers.entry(layer.key()).or_default().push(Adapter {
            down,
            up,
            scale,
            conv,
        });
        Ok(())
    }

    /// Number of layers with at least one adapter.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

thread_local! {
    static BUILDING: RefCell<Option<(&'static str, Vec<LayerInfo>)>> = const { RefCell::new(None) };
    static ACTIVE: RefCell<Option<Arc<AdapterSet>>> = const { RefCell::new(None) };
}

/// Runs `build` (which constructs a network) and returns what it built with the adaptable layers
/// it created, named under `component`.
pub fn registering<T>(component: &'static str, build: impl FnOnce() -> T) -> (T, Vec<LayerInfo>) {
    struct Restore(Option<(&'static str, Vec<LayerInfo>)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            BUILDING.with(|b| *b.borrow_mut() = prev);
        }
    }
    let prev = BUILDING.with(|b| b.borrow_mut().replace((component, Vec::new())));
    let restore = Restore(prev);
    let out = build();
    let layers = BUILDING
        .with(|b| b.borrow_mut().take())
        .map(|(_, l)| l)
        .unwrap_or_default();
    drop(restore);
    (out, layers)
}

/// Runs `f` with `set` active on this thread (none: the base network), then restores the set
/// that was active before, also when `f` panics.
pub fn with_adapters<T>(set: Option<Arc<AdapterSet>>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Arc<AdapterSet>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            ACTIVE.with(|a| *a.borrow_mut() = prev);
        }
    }
    let prev = ACTIVE.with(|a| std::mem::replace(&mut *a.borrow_mut(), set));
    let _restore = Restore(prev);
    f()
}

/// Names a layer being built with weight path `path` (without `.weight`) when a network is being
/// registered.
pub(crate) fn register(path: String, shape: LayerShape) -> Option<Arc<str>> {
    BUILDING.with(|b| {
        let mut b = b.borrow_mut();
        let (component, layers) = b.as_mut()?;
        let info = LayerInfo {
            component,
            path,
            shape,
        };
        let key: Arc<str> = info.key().into();
        layers.push(info);
        Some(key)
    })
}

/// Adds the active adapters of layer `key` (input `x`, base output `y`) to `y`.
pub(crate) fn adapt(key: &Option<Arc<str>>, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
    let Some(key) = key else { return Ok(y) };
    let Some(set) = ACTIVE.with(|a| a.borrow().clone()) else {
        return Ok(y);
    };
    let Some(adapters) = set.layers.get(&**key) else {
        return Ok(y);
    };
    let mut y = y;
    for a in adapters {
        // Adapters are read onto the model's main device and dtype; a text encoder kept
        // elsewhere (FLUX with --text-encoder-device) gets copies (no-ops otherwise).
        let place = |t: &Tensor| t.to_device(x.device())?.to_dtype(x.dtype());
        let delta = match &a.conv {
            None => candle_nn::Linear::new(place(&a.up)?, None)
                .forward(&candle_nn::Linear::new(place(&a.down)?, None).forward(x)?)?,
            // Convolutions live in the UNet, on the model's device and dtype.
            Some(down) => {
                let h = down.forward(x)?;
                let (b, r, hh, ww) = h.dims4()?;
                // The 1x1 up projection as one matmul over the pixels.
                let up = a.up.reshape((a.up.dim(0)?, r))?;
                up.broadcast_matmul(&h.reshape((b, r, hh * ww))?)?
                    .reshape((b, (), hh, ww))?
            }
        };
        y = (y + (delta * a.scale)?)?;
    }
    Ok(y)
}

/// A linear layer, adaptable when built inside [`registering`].
#[derive(Debug, Clone)]
pub struct Linear {
    state: Arc<LinearState>,
    key: Option<Arc<str>>,
    /// Whether the weights move into f32 panels at the first CPU call.
    takes_panels: bool,
}

/// A linear layer's weights: candle's layer, or for a layer built [`Linear::with_panels`], from
/// its first call on a CPU with AVX-512F, the f32 panels of [`super::cpu_gemm`], the tensor then
/// dropped. The panels multiply by the transposed weight at about 190 GFLOPS on two Zen 5 cores
/// where candle's matmul reaches 100-125 and packs the weight on every call, which matters
/// where the rows are few: CLIP's 77 tokens, 0.15 s -> 0.11 s.
///
/// Only the text encoders take them. Every UNet layer packing at its first call made a step
/// 2-3% faster but left freed blocks between that step's activations that the allocator could
/// not reuse (SDXL UNet stage peak RSS 12.96 GB against 11.6); packing at load instead holds a
/// single-file checkpoint's tensors and their panels at once. The choice is the layer's, not
/// its first call's, so that a job's numbers never depend on the jobs before it.
#[derive(Debug)]
struct LinearState {
    candle: Mutex<Option<candle_nn::Linear>>,
    /// Set at the first CPU f32 call: the panels, or `None` where candle's matmul stays.
    panels: OnceLock<Option<Arc<PackedLinear>>>,
    /// The weights packed for the CPU's bf16 products: at load where the process runs them
    /// (`candle` is then `None`), else at the first bf16 call.
    bf16: OnceLock<Arc<PackedLinear>>,
}

impl Linear {
    /// The layer of `inner`'s weights; with bf16 products on the CPU, those weights packed into
    /// bf16 pairs now and dropped ([`PackedLinear::at_load`]).
    fn new(inner: candle_nn::Linear, key: Option<Arc<str>>) -> candle_core::Result<Self> {
        let bf16 = OnceLock::new();
        let candle = match PackedLinear::at_load(inner.weight(), inner.bias())? {
            Some(packed) => {
                let _ = bf16.set(packed);
                None
            }
            None => Some(inner),
        };
        let state = LinearState {
            candle: Mutex::new(candle),
            panels: OnceLock::new(),
            bf16,
        };
        Ok(Linear {
            state: Arc::new(state),
            key,
            takes_panels: false,
        })
    }

    /// This layer, its weights moving into f32 panels at its first call on a CPU with AVX-512F
    /// (see [`LinearState`]): for layers whose calls have few rows.
    pub fn with_panels(self) -> Self {
        Linear {
            takes_panels: true,
            ..self
        }
    }

    fn candle(&self) -> std::sync::MutexGuard<'_, Option<candle_nn::Linear>> {
        // A panic elsewhere while the lock was held leaves the layer as it was.
        self.state.candle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The layer's f32 panels, packed now if this is the first call; `None` where the layer
    /// does not take them, the weights are not f32 on the CPU or the CPU has no AVX-512F.
    fn panels(&self) -> candle_core::Result<Option<Arc<PackedLinear>>> {
        if !self.takes_panels {
            return Ok(None);
        }
        if let Some(p) = self.state.panels.get() {
            return Ok(p.clone());
        }
        let mut candle = self.candle();
        if let Some(p) = self.state.panels.get() {
            return Ok(p.clone());
        }
        let packed = match candle.as_ref() {
            Some(l) if l.weight().device().is_cpu() && l.weight().dtype() == DType::F32 => {
                PackedLinear::f32(l.weight(), l.bias())?.map(Arc::new)
            }
            _ => None,
        };
        if packed.is_some() {
            *candle = None;
        }
        Ok(self.state.panels.get_or_init(|| packed).clone())
    }

    /// `x W^T + b`: in bf16 products where the CPU runs f32 layers so (see
    /// [`super::cpu_gemm`]).
    fn base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let bf16 = takes_bf16(x);
        if bf16 {
            if let Some(b) = self.state.bf16.get() {
                return b.forward(x);
            }
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            if let Some(p) = self.panels()? {
                if !bf16 {
                    return p.forward(x);
                }
                let b = Arc::new(p.to_bf16()?);
                return self.state.bf16.get_or_init(|| b).forward(x);
            }
        }
        let Some(l) = self.candle().clone() else {
            candle_core::bail!(
                "linear layer: its weights are packed for the CPU's {} products only, not for {:?} {:?}",
                if self.state.bf16.get().is_some() { "bf16" } else { "f32" },
                x.dtype(),
                x.device()
            );
        };
        if bf16 {
            return PackedLinear::cached(&self.state.bf16, l.weight(), l.bias())?.forward(x);
        }
        l.forward(x)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        adapt(&self.key, x, self.base(x)?)
    }
}

/// A linear layer with bias read from `vb`.
pub fn linear(din: usize, dout: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let key = register(vb.prefix(), LayerShape::Linear { din, dout });
    Linear::new(candle_nn::linear(din, dout, vb)?, key)
}

/// A linear layer without bias read from `vb`.
pub fn linear_no_bias(din: usize, dout: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let key = register(vb.prefix(), LayerShape::Linear { din, dout });
    Linear::new(candle_nn::linear_no_bias(din, dout, vb)?, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The layer computes candle's linear layer before and after its weights move into the
    /// f32 panels (on a CPU with AVX-512F), and says so by dropping candle's copy.
    #[test]
    fn linear_equals_candle_before_and_after_packing() {
        let dev = Device::Cpu;
        let mut rng = crate::samplers::TorchRng::new(21);
        let w = rng.randn(&[45, 70], &dev).unwrap();
        let b = rng.randn(&[45], &dev).unwrap();
        let x = rng.randn(&[2, 9, 70], &dev).unwrap();
        let reference = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let want = reference.forward(&x).unwrap();
        let tensors = HashMap::from([("weight".to_string(), w), ("bias".to_string(), b)]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let layer = linear(70, 45, vb).unwrap().with_panels();
        for _ in 0..2 {
            let diff = crate::modules::max_abs_diff(&layer.forward(&x).unwrap(), &want);
            assert!(diff < 1e-5, "differs from candle's by {diff}");
        }
        let packed = super::super::cpu_gemm::avx512_hardware();
        assert_eq!(layer.candle().is_none(), packed);
    }
}
