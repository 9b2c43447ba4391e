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
use std::sync::Arc;

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
    base: Base,
    key: Option<Arc<str>>,
    /// The weights packed for the CPU's bf16 products, at the first use with `--dtype bf16`.
    bf16: std::sync::OnceLock<Arc<PackedLinear>>,
}

/// Where a linear layer's weights live.
#[derive(Debug, Clone)]
enum Base {
    Candle(candle_nn::Linear),
    /// f32 on a CPU with AVX-512F: the weights only as the panels of [`super::cpu_gemm`]
    /// (the tensor is dropped), whose kernel runs the transposed-weight product at about 190
    /// GFLOPS on two Zen 5 cores where candle's matmul reaches 100-125.
    Panels(Arc<PackedLinear>),
}

impl Linear {
    fn new(inner: candle_nn::Linear, key: Option<Arc<str>>) -> candle_core::Result<Self> {
        let w = inner.weight();
        let base = match (w.device().is_cpu() && w.dtype() == DType::F32)
            .then(|| PackedLinear::f32(w, inner.bias()))
            .transpose()?
            .flatten()
        {
            Some(p) => Base::Panels(Arc::new(p)),
            None => Base::Candle(inner),
        };
        Ok(Linear {
            base,
            key,
            bf16: std::sync::OnceLock::new(),
        })
    }

    /// `x W^T + b`: in bf16 products where the CPU runs f32 layers so (see
    /// [`super::cpu_gemm`]).
    fn base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.base {
            Base::Candle(l) if takes_bf16(x) => {
                PackedLinear::cached(&self.bf16, l.weight(), l.bias())?.forward(x)
            }
            Base::Candle(l) => l.forward(x),
            Base::Panels(p) if takes_bf16(x) => {
                if let Some(b) = self.bf16.get() {
                    return b.forward(x);
                }
                let b = Arc::new(p.to_bf16()?);
                self.bf16.get_or_init(|| b).forward(x)
            }
            Base::Panels(p) => p.forward(x),
        }
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
