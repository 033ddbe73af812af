//! The mask decoder's two-way transformer (`TwoWayTransformer`): prompt tokens attend to the
//! image embedding and the image embedding attends back to the tokens, layer by layer.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use sidbooth_engine::nn::{softmax_last, LayerNorm, Linear};

use super::config::SamConfig;

/// `nn.LayerNorm`'s default, used throughout the decoder.
const NORM_EPS: f64 = 1e-5;

pub struct TwoWayTransformer {
    layers: Vec<TwoWayBlock>,
    final_attn_token_to_image: Attention,
    norm_final_attn: LayerNorm,
}

impl TwoWayTransformer {
    pub fn load(vb: VarBuilder, cfg: &SamConfig) -> Result<Self> {
        let d = cfg.prompt_embed_dim;
        let layers = (0..cfg.decoder_depth)
            .map(|i| TwoWayBlock::load(vb.pp(format!("layers.{i}")), cfg, i == 0))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            final_attn_token_to_image: Attention::load(
                vb.pp("final_attn_token_to_image"),
                cfg,
                cfg.decoder_attention_downsample_rate,
            )?,
            norm_final_attn: LayerNorm::load(vb.pp("norm_final_attn"), d, NORM_EPS)?,
        })
    }

    /// `image` and `image_pe` `[B, HW, D]` (channels-last), `tokens` `[B, T, D]`; returns the
    /// processed tokens `[B, T, D]` and image `[B, HW, D]`.
    pub fn forward(
        &self,
        image: &Tensor,
        image_pe: &Tensor,
        tokens: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (mut queries, mut keys) = (tokens.clone(), image.clone());
        for layer in &self.layers {
            (queries, keys) = layer.forward(&queries, &keys, tokens, image_pe)?;
        }
        let q = (&queries + tokens)?;
        let k = keys.broadcast_add(image_pe)?;
        let attn = self.final_attn_token_to_image.forward(&q, &k, &keys)?;
        let queries = self.norm_final_attn.forward(&(queries + attn)?)?;
        Ok((queries, keys))
    }
}

struct TwoWayBlock {
    self_attn: Attention,
    norm1: LayerNorm,
    cross_attn_token_to_image: Attention,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    norm3: LayerNorm,
    norm4: LayerNorm,
    cross_attn_image_to_token: Attention,
    /// The first layer's self-attention sees the tokens without their positional part.
    skip_first_layer_pe: bool,
}

impl TwoWayBlock {
    fn load(vb: VarBuilder, cfg: &SamConfig, skip_first_layer_pe: bool) -> Result<Self> {
        let (d, rate) = (cfg.prompt_embed_dim, cfg.decoder_attention_downsample_rate);
        let norm = |name: &str| LayerNorm::load(vb.pp(name), d, NORM_EPS);
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), cfg, 1)?,
            norm1: norm("norm1")?,
            cross_attn_token_to_image: Attention::load(
                vb.pp("cross_attn_token_to_image"),
                cfg,
                rate,
            )?,
            norm2: norm("norm2")?,
            lin1: Linear::load(vb.pp("mlp.lin1"), d, cfg.decoder_mlp_dim, true)?,
            lin2: Linear::load(vb.pp("mlp.lin2"), cfg.decoder_mlp_dim, d, true)?,
            norm3: norm("norm3")?,
            norm4: norm("norm4")?,
            cross_attn_image_to_token: Attention::load(
                vb.pp("cross_attn_image_to_token"),
                cfg,
                rate,
            )?,
            skip_first_layer_pe,
        })
    }

    fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        query_pe: &Tensor,
        key_pe: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)?
        } else {
            let q = (queries + query_pe)?;
            (queries + self.self_attn.forward(&q, &q, queries)?)?
        };
        let queries = self.norm1.forward(&queries)?;

        let q = (&queries + query_pe)?;
        let k = keys.broadcast_add(key_pe)?;
        let attn = self.cross_attn_token_to_image.forward(&q, &k, keys)?;
        let queries = self.norm2.forward(&(queries + attn)?)?;

        // the decoder's MLP uses ReLU (TwoWayTransformer's default activation)
        let mlp = self.lin2.forward(&self.lin1.forward(&queries)?.relu()?)?;
        let queries = self.norm3.forward(&(queries + mlp)?)?;

        let q = (&queries + query_pe)?;
        let attn = self.cross_attn_image_to_token.forward(&k, &q, &queries)?;
        let keys = self.norm4.forward(&(keys + attn)?)?;
        Ok((queries, keys))
    }
}

/// Multi-head attention whose projections may narrow the width by `downsample_rate`.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &SamConfig, downsample_rate: usize) -> Result<Self> {
        let d = cfg.prompt_embed_dim;
        let inner = d / downsample_rate;
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), d, inner, true)?,
            k_proj: Linear::load(vb.pp("k_proj"), d, inner, true)?,
            v_proj: Linear::load(vb.pp("v_proj"), d, inner, true)?,
            out_proj: Linear::load(vb.pp("out_proj"), inner, d, true)?,
            heads: cfg.decoder_num_heads,
        })
    }

    /// `[B, N, C]` to `[B, heads, N, C / heads]`.
    fn separate_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let q = self.separate_heads(&self.q_proj.forward(q)?)?;
        let k = self.separate_heads(&self.k_proj.forward(k)?)?;
        let v = self.separate_heads(&self.v_proj.forward(v)?)?;
        let (b, h, n, c) = q.dims4()?;
        let attn = (q.matmul(&k.t()?)? / (c as f64).sqrt())?;
        let out = softmax_last(&attn)?.matmul(&v)?;
        self.out_proj
            .forward(&out.transpose(1, 2)?.reshape((b, n, h * c))?)
    }
}
