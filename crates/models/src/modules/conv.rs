//! The 2D convolution layer of our networks: the CPU kernel of [`super::conv_kernel`] plus, when
//! its network is registered, the LoRA adapters of [`super::adapter`].

use std::sync::Arc;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::adapter::{self, LayerShape};
use super::conv_kernel::CpuConv2d;

#[derive(Debug, Clone)]
pub struct Conv2d {
    base: CpuConv2d,
    /// The layer's name when it takes adapters (see [`adapter`]).
    key: Option<Arc<str>>,
}

impl Conv2d {
    pub fn new(inner: candle_nn::Conv2d) -> candle_core::Result<Self> {
        Ok(Self {
            base: CpuConv2d::new(inner)?,
            key: None,
        })
    }

    /// `inner`, read from `vb`, as a layer that takes adapters when its network is registered.
    pub fn adaptable(inner: candle_nn::Conv2d, vb: &VarBuilder) -> candle_core::Result<Self> {
        let cfg = *inner.config();
        let (cout, cin, k, _) = inner.weight().dims4()?;
        let mut conv = Self::new(inner)?;
        conv.key = adapter::register(
            vb.prefix(),
            LayerShape::Conv {
                cin,
                cout,
                k,
                stride: cfg.stride,
                padding: cfg.padding,
            },
        );
        Ok(conv)
    }

    pub fn weight(&self) -> &Tensor {
        self.base.weight()
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        adapter::adapt(&self.key, xs, self.base.forward(xs)?)
    }
}
