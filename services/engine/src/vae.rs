//! diffusers' `AutoencoderKL` (encoder and decoder), with diffusers' weight names (the older
//! `query/key/value/proj_attn` attention names are accepted too).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::VaeConfig;
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::unet::ResnetBlock2D;

const EPS: f64 = 1e-6;

#[derive(Clone, Debug)]
struct VaeAttention {
    group_norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl VaeAttention {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        let new_names = vb.contains_tensor("to_q.weight");
        let (q, k, v, o) = if new_names {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        let load = |n: &str| -> Result<Linear> {
            let vbn = vb.pp(n);
            // older checkpoints store 1x1 conv-shaped weights for these
            let w = if new_names {
                vbn.get((c, c), "weight")?
            } else {
                vbn.get_unchecked("weight")?
            };
            let w = if w.rank() == 4 {
                w.squeeze(3)?.squeeze(2)?
            } else {
                w
            };
            if w.dims() != [c, c] {
                candle_core::bail!("vae attention {n}: weight shape {:?}", w.dims());
            }
            let b = vbn.get(c, "bias")?;
            Ok(Linear::new(vbn.prefix(), w, Some(b)))
        };
        Ok(Self {
            group_norm: GroupNorm::load(vb.pp("group_norm"), groups, c, EPS)?,
            q: load(q)?,
            k: load(k)?,
            v: load(v)?,
            out: load(o)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hs = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let q = self.q.forward(&hs)?;
        let k = self.k.forward(&hs)?;
        let v = self.v.forward(&hs)?;
        let dt = q.dtype();
        let scale = (c as f64).powf(-0.5);
        // One head: [b, 1, hw, c]; scores in f32 (as diffusers upcasts the VAE's attention).
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32)?.unsqueeze(1);
        let o =
            crate::kernels::attention::attention(&f32(&q)?, &f32(&k)?, &v.unsqueeze(1)?, scale)?
                .squeeze(1)?
                .to_dtype(dt)?;
        let o = self.out.forward(&o)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }
}

#[derive(Clone, Debug)]
struct Mid {
    r0: ResnetBlock2D,
    attn: Option<VaeAttention>,
    r1: ResnetBlock2D,
}

impl Mid {
    fn new(vb: VarBuilder, c: usize, groups: usize, attn: bool) -> Result<Self> {
        Ok(Self {
            r0: ResnetBlock2D::new(vb.pp("resnets.0"), c, c, None, groups, EPS, 1.0)?,
            attn: if attn {
                Some(VaeAttention::new(vb.pp("attentions.0"), c, groups)?)
            } else {
                None
            },
            r1: ResnetBlock2D::new(vb.pp("resnets.1"), c, c, None, groups, EPS, 1.0)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.r0.forward(x, None)?;
        if let Some(a) = &self.attn {
            x = a.forward(&x)?;
        }
        self.r1.forward(&x, None)
    }
}

#[derive(Clone, Debug)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<(Vec<ResnetBlock2D>, Option<Conv2d>)>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

#[derive(Clone, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    up: Vec<(Vec<ResnetBlock2D>, Option<Conv2d>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// Diagonal Gaussian posterior of the encoder.
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// `mean + std * noise` (`noise` standard normal, same shape as `mean`).
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.std * noise)?
    }
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }
}

/// The KL autoencoder of Stable Diffusion.
#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
}

impl AutoencoderKL {
    #[allow(clippy::needless_range_loop)]
    pub fn new(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let boc = &c.block_out_channels;
        let nb = boc.len();
        let g = c.norm_num_groups;
        let lat = c.latent_channels;
        // encoder
        let ve = vb.pp("encoder");
        let conv_in = Conv2d::load(ve.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1)?;
        let mut down = Vec::new();
        let mut out_c = boc[0];
        for i in 0..nb {
            let in_c = out_c;
            out_c = boc[i];
            let vbd = ve.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        vbd.pp(format!("resnets.{j}")),
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        None,
                        g,
                        EPS,
                        1.0,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let ds = if i + 1 < nb {
                Some(Conv2d::load(
                    vbd.pp("downsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    2,
                    0,
                )?)
            } else {
                None
            };
            down.push((resnets, ds));
        }
        let encoder = Encoder {
            conv_in,
            down,
            mid: Mid::new(
                ve.pp("mid_block"),
                boc[nb - 1],
                g,
                c.mid_block_add_attention,
            )?,
            norm_out: GroupNorm::load(ve.pp("conv_norm_out"), g, boc[nb - 1], EPS)?,
            conv_out: Conv2d::load(ve.pp("conv_out"), boc[nb - 1], 2 * lat, 3, 1, 1)?,
        };
        // decoder
        let vd = vb.pp("decoder");
        let rev: Vec<usize> = boc.iter().rev().cloned().collect();
        let mut up = Vec::new();
        let mut out_c = rev[0];
        for i in 0..nb {
            let prev = out_c;
            out_c = rev[i];
            let vbu = vd.pp(format!("up_blocks.{i}"));
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(
                        vbu.pp(format!("resnets.{j}")),
                        if j == 0 { prev } else { out_c },
                        out_c,
                        None,
                        g,
                        EPS,
                        1.0,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let us = if i + 1 < nb {
                Some(Conv2d::load(
                    vbu.pp("upsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up.push((resnets, us));
        }
        let decoder = Decoder {
            conv_in: Conv2d::load(vd.pp("conv_in"), lat, boc[nb - 1], 3, 1, 1)?,
            mid: Mid::new(
                vd.pp("mid_block"),
                boc[nb - 1],
                g,
                c.mid_block_add_attention,
            )?,
            up,
            norm_out: GroupNorm::load(vd.pp("conv_norm_out"), g, boc[0], EPS)?,
            conv_out: Conv2d::load(vd.pp("conv_out"), boc[0], c.out_channels, 3, 1, 1)?,
        };
        Ok(Self {
            config: c.clone(),
            encoder,
            decoder,
            quant_conv: Conv2d::load(vb.pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0)?,
            post_quant_conv: Conv2d::load(vb.pp("post_quant_conv"), lat, lat, 1, 1, 0)?,
        })
    }

    /// Encodes images `[B, 3, H, W]` in `[-1, 1]` to the latent posterior (unscaled).
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(x)?;
        for (resnets, ds) in &e.down {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = ds {
                // diffusers pads (0, 1, 0, 1) before the stride-2 convolution
                h = d.forward(&h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        h = e.mid.forward(&h)?;
        h = e.conv_out.forward(&e.norm_out.forward_silu(&h)?)?;
        let moments = self.quant_conv.forward(&h)?;
        let lat = self.config.latent_channels;
        let mean = moments.narrow(1, 0, lat)?;
        let logvar = moments.narrow(1, lat, lat)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(DiagonalGaussian { mean, std })
    }

    /// Decodes unscaled latents `[B, C, h, w]` to images in about `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let d = &self.decoder;
        let z = self.post_quant_conv.forward(z)?;
        let mut h = d.conv_in.forward(&z)?;
        h = d.mid.forward(&h)?;
        for (resnets, us) in &d.up {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = us {
                let (_, _, hh, ww) = h.dims4()?;
                h = u.forward(&h.upsample_nearest2d(hh * 2, ww * 2)?)?;
            }
        }
        d.conv_out.forward(&d.norm_out.forward_silu(&h)?)
    }

    /// Diffusion latents of images in `[-1, 1]`: `(mean + std * noise) * scaling_factor`
    /// (`noise` standard normal; `None` takes the mean, diffusers' `latent_dist.mode()`).
    pub fn encode_latents(&self, x: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let d = self.encode(x)?;
        let z = match noise {
            Some(n) => d.sample_with(n)?,
            None => d.mode(),
        };
        z.affine(self.config.scaling_factor, 0.0)
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Spatial downsampling factor (8 for SD).
    pub fn scale(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }
}
