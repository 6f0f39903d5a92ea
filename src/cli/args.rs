//! The flags several subcommands share: where the model comes from and runs,
//! and the adapters applied to it.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::device::{resolve_model_dir, DeviceArg, DtypeArg};
use crate::models::Pretrained;
use crate::peft_model;
use crate::quant::Quantize;

/// Where the model comes from and where it runs.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json), or a
    /// Hub id ORG/NAME[@REVISION] found in (or, online, downloaded into) the Hugging Face cache.
    /// Defaults to the SmolLM2-135M-Instruct that ./scripts/setup.sh converts into models/.
    #[arg(long, value_name = "DIR|ID")]
    pub model: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N; auto uses CUDA when libtorch can.
    #[arg(long, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Dtype of the frozen weights: auto is bf16 on CUDA and on CPUs with native bf16 (where it is about 4x faster), fp32 elsewhere.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,
    /// Allow TF32 tensor cores for fp32 matmuls on CUDA (faster, about 10 bits of mantissa).
    #[arg(long)]
    pub tf32: bool,
    /// Store the frozen linear layers quantized as bitsandbytes does (nf4, fp4 or int8);
    /// embeddings, norms and lm_head stay in --dtype.
    #[arg(long, value_enum, value_name = "nf4|fp4|int8")]
    pub quantize: Option<Quantize>,
    /// Quantize the 4-bit absmax values again (double quantization; default false as in transformers).
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL", default_value_t = false)]
    pub bnb_4bit_use_double_quant: bool,
    /// Dtype the 4-bit matmuls run in (default: --dtype).
    #[arg(long, value_enum)]
    pub bnb_4bit_compute_dtype: Option<DtypeArg>,
}

impl ModelArgs {
    /// Loads the model and tokenizer these arguments name.
    pub fn load(&self) -> Result<Pretrained> {
        if self.tf32 {
            crate::device::allow_tf32();
        }
        let place = crate::device::Placement::resolve(self.device, self.dtype)?;
        let dir = resolve_model_dir(self.model.clone())?;
        let start = std::time::Instant::now();
        let quantize = self.quantization(place.kind, place.device)?;
        let model = Pretrained::load_quantized(&dir, place.kind, place.device, quantize.as_ref())?;
        eprintln!(
            "{}: {}{}, loaded in {:.2} s",
            dir.display(),
            place.describe_choice(self.dtype),
            self.quantize
                .map(|q| format!(", {q:?} base"))
                .unwrap_or_default(),
            start.elapsed().as_secs_f64()
        );
        Ok(model)
    }

    /// What `--quantize` and the `--bnb-4bit-*` flags ask for.
    pub fn quantization(
        &self,
        kind: tch::Kind,
        device: tch::Device,
    ) -> Result<Option<crate::quant::BnbQuantization>> {
        let four_bit_flags =
            self.bnb_4bit_use_double_quant || self.bnb_4bit_compute_dtype.is_some();
        match self.quantize {
            None if four_bit_flags => {
                anyhow::bail!("--bnb-4bit-use-double-quant and --bnb-4bit-compute-dtype need --quantize nf4 or fp4")
            }
            Some(Quantize::Int8) if four_bit_flags => anyhow::bail!(
                "--bnb-4bit-use-double-quant and --bnb-4bit-compute-dtype apply to --quantize nf4 or fp4, not int8"
            ),
            None => Ok(None),
            Some(q) => {
                let compute = self
                    .bnb_4bit_compute_dtype
                    .map_or(kind, |d| d.resolve(device));
                Ok(Some(q.config(self.bnb_4bit_use_double_quant, compute)))
            }
        }
    }
}

/// Adapters to apply on top of the base model.
#[derive(Args, Debug, Clone)]
pub struct AdapterArgs {
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or Hub id
    /// ORG/NAME[@REVISION]; repeat to combine several, with --weights.
    #[arg(long, value_name = "DIR|ID")]
    pub adapter: Vec<PathBuf>,
    /// One weight per adapter, combined as PEFT's add_weighted_adapter(combination_type="linear").
    #[arg(long, value_delimiter = ',', value_name = "W,W,...")]
    pub weights: Vec<f64>,
    /// Fold the adapters into the weights before decoding (one matmul per layer instead of
    /// three): auto (on CUDA), always, never. Quantized layers keep theirs unmerged.
    #[arg(long, value_enum, default_value_t = peft_model::MergeForDecoding::Auto)]
    pub merge_for_decoding: peft_model::MergeForDecoding,
}

impl AdapterArgs {
    /// The adapter folders: local ones as given, Hub ids from the Hugging Face cache.
    pub fn dirs(&self) -> Result<Vec<PathBuf>> {
        self.adapter
            .iter()
            .map(|a| crate::hub::resolve(a, crate::hub::RepoKind::Adapter))
            .collect()
    }
}

/// Folds the adapters of dense layers into their weights before decoding
/// when `--merge-for-decoding` says so (by default on CUDA only), and says
/// what it did.
pub fn merge_for_decoding(
    model: &mut crate::models::LlamaForCausalLM,
    when: peft_model::MergeForDecoding,
) -> Result<()> {
    let has_adapters = !peft_model::trainable_parameters(model).is_empty();
    if has_adapters && when.merges(model.device().is_cuda()) {
        let (merged, kept) = peft_model::merge_for_decoding(model)?;
        eprintln!(
            "adapters merged into {merged} layers for decoding{}",
            if kept > 0 {
                format!("; {kept} quantized layers keep theirs unmerged (merging would round the update away)")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
