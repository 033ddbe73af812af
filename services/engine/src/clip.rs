//! transformers' `CLIPTextModel` (text tower of SD 1.x / SD 2.x), differentiable.
//!
//! Weight names are transformers': `text_model.embeddings.token_embedding.weight`,
//! `text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj`, `...layer_norm1`, `...mlp.fc1`,
//! `text_model.final_layer_norm`. `forward` returns `last_hidden_state` (after the final layer
//! norm), which is what `StableDiffusionPipeline` passes to the UNet; SD 2.x checkpoints have 23
//! layers (the penultimate layer of OpenCLIP ViT-H) so nothing else is needed.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::ClipTextConfig;
use crate::nn::{softmax_last, Activation, LayerNorm, Linear, VisitLinears};
use crate::recompute::{checkpoint, GradSink, Segment};
use crate::tokenizer::ClipTokenizer;
use crate::weights::NamedWeights;

#[derive(Clone, Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), h, h, true)?,
            k_proj: Linear::load(vb.pp("k_proj"), h, h, true)?,
            v_proj: Linear::load(vb.pp("v_proj"), h, h, true)?,
            out_proj: Linear::load(vb.pp("out_proj"), h, h, true)?,
            heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?.affine(scale, 0.0)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let w = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let p = softmax_last(&w.to_dtype(DType::F32)?)?.to_dtype(w.dtype())?;
        let o = p.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out_proj.forward(&o)
    }
}

#[derive(Clone, Debug)]
struct ClipLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: Activation,
}

impl ClipLayer {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let act = Activation::parse(&c.hidden_act).map_err(candle_core::Error::msg)?;
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), c)?,
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), c.hidden_size, c.layer_norm_eps)?,
            fc1: Linear::load(vb.pp("mlp.fc1"), c.hidden_size, c.intermediate_size, true)?,
            fc2: Linear::load(vb.pp("mlp.fc2"), c.intermediate_size, c.hidden_size, true)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), c.hidden_size, c.layer_norm_eps)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.fc2.forward(
            &self
                .act
                .apply(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?)?,
        )?;
        x + h
    }
}

/// An encoder layer as a recomputed segment: `(x, causal mask)`.
struct LayerSegment(ClipLayer);

impl Segment for LayerSegment {
    fn name(&self) -> &'static str {
        "recompute-clip-layer"
    }
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.0.forward(x, mask)
    }
}

/// CLIP text transformer.
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    /// `[vocab, hidden]`; replace with a `Var`'s tensor for textual inversion.
    pub token_embedding: Tensor,
    pub position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    weights: NamedWeights,
    /// Gradient checkpointing: encoder layers are recomputed in the backward pass and the
    /// gradients of their weights go here (see [`crate::recompute`]).
    recompute: Option<Arc<GradSink>>,
}

impl ClipTextModel {
    /// Builds the model from `vb` (rooted at the component, i.e. names start with `text_model.`).
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        // Real SD checkpoints (transformers 4) prefix every name with `text_model.`; transformers 5
        // saves CLIPTextModel without it. Both load; module paths are always `text_model.…`.
        let prefixed = vb.contains_tensor("text_model.embeddings.token_embedding.weight");
        let vbt = if prefixed {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let emb = vbt.pp("embeddings");
        let token_embedding = emb.get(
            (config.vocab_size, config.hidden_size),
            "token_embedding.weight",
        )?;
        let position_embedding = emb.get(
            (config.max_position_embeddings, config.hidden_size),
            "position_embedding.weight",
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipLayer::new(vbt.pp(format!("encoder.layers.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(
            vbt.pp("final_layer_norm"),
            config.hidden_size,
            config.layer_norm_eps,
        )?;
        let mut layers = layers;
        if !prefixed {
            for l in &mut layers {
                for lin in [
                    &mut l.self_attn.q_proj,
                    &mut l.self_attn.k_proj,
                    &mut l.self_attn.v_proj,
                    &mut l.self_attn.out_proj,
                    &mut l.fc1,
                    &mut l.fc2,
                ] {
                    lin.name = format!("text_model.{}", lin.name);
                }
            }
        }
        Ok(Self {
            config: config.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            weights: Vec::new(),
            recompute: None,
        })
    }

    /// Turns gradient checkpointing of the encoder layers on (with the sink that collects the
    /// recomputed weights' gradients) or off. For a text encoder that trains (or that passes a
    /// gradient to a trained token embedding); a frozen one keeps no graph anyway.
    pub fn set_gradient_checkpointing(&mut self, sink: Option<Arc<GradSink>>) {
        self.recompute = sink;
    }

    /// The sink set by [`set_gradient_checkpointing`](Self::set_gradient_checkpointing), if any.
    pub fn gradient_checkpointing(&self) -> Option<&Arc<GradSink>> {
        self.recompute.as_ref()
    }

    /// Grows the token embedding to `vocab_size` rows (for tokens added to the tokenizer); each new
    /// row is a copy of row `init_from` (e.g. the class word's token). Returns the new embedding;
    /// turn it into a `Var` and assign `token_embedding` to train it.
    pub fn resize_token_embeddings(&mut self, vocab_size: usize, init_from: u32) -> Result<Tensor> {
        let (n, _) = self.token_embedding.dims2()?;
        if vocab_size > n {
            let row = self.token_embedding.narrow(0, init_from as usize, 1)?;
            let extra = row.repeat((vocab_size - n, 1))?;
            self.token_embedding = Tensor::cat(&[&self.token_embedding, &extra], 0)?;
            self.config.vocab_size = vocab_size;
        }
        Ok(self.token_embedding.clone())
    }

    /// Appends `rows` `[n, hidden]` to the token embedding: the embeddings of `n` tokens just
    /// added to the tokenizer, whose ids follow the current rows. Returns the first new id.
    pub fn append_token_embeddings(&mut self, rows: &Tensor) -> Result<u32> {
        let (n, hidden) = self.token_embedding.dims2()?;
        let (k, row_hidden) = rows.dims2()?;
        if row_hidden != hidden {
            candle_core::bail!(
                "token embeddings of width {row_hidden}, the text encoder's are {hidden}"
            );
        }
        let rows = rows
            .to_dtype(self.token_embedding.dtype())?
            .to_device(self.token_embedding.device())?;
        self.token_embedding = Tensor::cat(&[&self.token_embedding, &rows], 0)?;
        self.config.vocab_size = n + k;
        Ok(n as u32)
    }

    /// Adds `token` to `tokenizer` with the embedding `rows` `[n, hidden]`: one token for one
    /// row, `token`, `token_1`, ... for several (diffusers' multi-vector convention, see
    /// [`ClipTokenizer::add_multi_vector_token`]). The tokenizer's new ids must be the rows that
    /// follow the embedding; neither changes when they are not. Returns the new ids.
    pub fn add_token(
        &mut self,
        tokenizer: &mut ClipTokenizer,
        token: &str,
        rows: &Tensor,
    ) -> crate::Result<Vec<u32>> {
        let (n, _) = rows.dims2()?;
        let next_row = self.token_embedding.dim(0)?;
        let mut grown = tokenizer.clone();
        let ids = grown.add_multi_vector_token(token, n)?;
        if ids[0] as usize != next_row {
            return Err(crate::Error::Invalid(format!(
                "the tokenizer gives {token} the id {} but the text encoder's next embedding row is {next_row}",
                ids[0]
            )));
        }
        self.append_token_embeddings(rows)?;
        *tokenizer = grown;
        Ok(ids)
    }

    pub(crate) fn set_named_weights(&mut self, w: NamedWeights) {
        self.weights = w;
    }

    /// The tensors the model was built from, by transformers name (e.g. `text_model.final_layer_norm.weight`).
    pub fn named_weights(&self) -> &NamedWeights {
        &self.weights
    }

    fn causal_mask(n: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
        let m: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(m, (1, 1, n, n), dev)?.to_dtype(dtype)
    }

    /// Embeds token ids `[B, N]` (u32) into `[B, N, hidden]` (last hidden state after the final layer norm).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        let flat = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let tok = self.token_embedding.index_select(&flat, 0)?.reshape((
            b,
            n,
            self.config.hidden_size,
        ))?;
        let pos = self.position_embedding.narrow(0, 0, n)?.unsqueeze(0)?;
        let mut x = tok.broadcast_add(&pos)?;
        let mask = Self::causal_mask(n, x.dtype(), x.device())?;
        for l in &self.layers {
            x = match &self.recompute {
                Some(sink) => checkpoint(LayerSegment(l.clone()), sink, &x, &mask)?,
                None => l.forward(&x, &mask)?,
            };
        }
        self.final_layer_norm.forward(&x)
    }

    /// Hidden state of the token with the highest id (the EOS token in CLIP), `[B, hidden]`.
    pub fn pooled(&self, last_hidden: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let idx = input_ids.to_dtype(DType::U32)?.argmax(D::Minus1)?;
        let b = idx.dims1()?;
        let rows = (0..b)
            .map(|i| {
                let j = idx.get(i)?.to_scalar::<u32>()? as usize;
                last_hidden.get(i)?.get(j)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    }

    /// Every [`Linear`] by module path, e.g. `text_model.encoder.layers.0.self_attn.q_proj`.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::new();
        self.visit_linears(&mut v);
        v.into_iter().map(|l| (l.name.clone(), l)).collect()
    }
}

impl VisitLinears for ClipTextModel {
    fn visit_linears<'a>(&'a mut self, out: &mut Vec<&'a mut Linear>) {
        for l in &mut self.layers {
            let a = &mut l.self_attn;
            out.push(&mut a.q_proj);
            out.push(&mut a.k_proj);
            out.push(&mut a.v_proj);
            out.push(&mut a.out_proj);
            out.push(&mut l.fc1);
            out.push(&mut l.fc2);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::kernels::rel_err;

    /// Recomputed encoder layers give the output and every gradient of the plain graph, and
    /// the layers' weights get theirs through the sink alone (so they were recomputed).
    #[test]
    fn recomputed_layers_give_the_plain_gradients() {
        let cfg = crate::tiny::TinyModel::text_config();
        let dev = Device::Cpu;
        let (vb, record) = crate::weights::seeded(4, DType::F32, &dev);
        ClipTextModel::new(vb, &cfg).unwrap();
        let vars: HashMap<String, Var> = record
            .take()
            .into_iter()
            .map(|(n, t)| (n, Var::from_tensor(&t).unwrap()))
            .collect();
        let tensors = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let (vb, _) = crate::weights::from_tensors(tensors, DType::F32, &dev);
        let plain = ClipTextModel::new(vb, &cfg).unwrap();
        let sink = Arc::new(GradSink::default());
        let mut recomputed = plain.clone();
        recomputed.set_gradient_checkpointing(Some(sink.clone()));

        let ids = Tensor::new(&[[0u32, 17, 250, 9, 1], [0, 3, 3, 40, 1]], &dev).unwrap();
        let (a, b) = (
            plain.forward(&ids).unwrap(),
            recomputed.forward(&ids).unwrap(),
        );
        assert!(rel_err(&b, &a) < 1e-6, "outputs differ");
        // A loss that weighs every position differently, so no gradient is trivially zero.
        let w = Tensor::arange(0f32, a.elem_count() as f32, &dev)
            .unwrap()
            .reshape(a.shape())
            .unwrap()
            .sin()
            .unwrap();
        let loss = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap();
        let outer_plain = loss(&a).backward().unwrap();
        let outer = loss(&b).backward().unwrap();
        let inner = sink.take();

        let mut layer_weights = 0;
        for (name, var) in &vars {
            let want = outer_plain
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no plain gradient"));
            let got = match (outer.get(var.as_tensor()), inner.get(&var.as_tensor().id())) {
                (Some(g), None) => g.clone(),
                (None, Some(g)) => {
                    layer_weights += 1;
                    g.clone()
                }
                (o, i) => panic!(
                    "{name}: outer gradient {}, recomputed gradient {}",
                    o.is_some(),
                    i.is_some()
                ),
            };
            assert!(name.contains("encoder.layers.") == inner.contains_key(&var.as_tensor().id()));
            assert!(rel_err(&got, want) < 1e-5, "{name}: gradients differ");
        }
        // q, k, v, out, fc1, fc2 (weight and bias) and two layer norms, per layer.
        assert_eq!(layer_weights, cfg.num_hidden_layers * 16);
    }
}
