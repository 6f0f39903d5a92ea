//! The rules every training setting must meet, each naming its field when
//! broken.

use std::fmt;

use super::config::PeftType;
use super::TrainConfig;
use crate::quant::Quantize;
use peft_adapters::lokr::InitWeights;
use peft_adapters::lora::InitLoraWeights;
use peft_adapters::method::AdapterConfig;

/// A setting with a value that cannot work: the field and why.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidSetting {
    /// The field name (as in config files and `training_args.json`).
    pub field: &'static str,
    /// What is wrong, e.g. "must be at least 1".
    pub problem: String,
}

impl fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "setting `{}` {}", self.field, self.problem)
    }
}

impl std::error::Error for InvalidSetting {}

impl TrainConfig {
    /// Refuses settings of another method than `peft_type`'s (set away from
    /// their defaults), and the methods' own rules.
    fn check_method_settings(&self) -> std::result::Result<(), InvalidSetting> {
        use PeftType::{Ia3, Loha, Lokr, Lora, Vera};
        let d = TrainConfig::default();
        let (l, dl) = (&self.lora, &d.lora);
        // (setting, set away from its default, the methods it belongs to)
        let settings: [(&'static str, bool, &[PeftType]); 24] = [
            ("lora_rank", l.r != dl.r, &[Lora, Loha, Lokr, Vera]),
            (
                "lora_alpha",
                l.lora_alpha != dl.lora_alpha,
                &[Lora, Loha, Lokr],
            ),
            ("lora_dropout", l.lora_dropout != dl.lora_dropout, &[Lora]),
            ("use_rslora", l.use_rslora, &[Lora]),
            ("use_dora", l.use_dora, &[Lora]),
            (
                "init_lora_weights",
                l.init_lora_weights != dl.init_lora_weights,
                &[Lora],
            ),
            (
                "rank_pattern",
                !l.rank_pattern.is_empty(),
                &[Lora, Loha, Lokr],
            ),
            (
                "alpha_pattern",
                !l.alpha_pattern.is_empty(),
                &[Lora, Loha, Lokr],
            ),
            (
                "layers_to_transform",
                l.layers_to_transform.is_some(),
                &[Lora, Loha, Lokr, Vera],
            ),
            (
                "loraplus_lr_ratio",
                self.loraplus_lr_ratio.is_some(),
                &[Lora],
            ),
            (
                "feedforward_modules",
                self.feedforward_modules != d.feedforward_modules,
                &[Ia3],
            ),
            (
                "init_ia3_weights",
                self.init_ia3_weights != d.init_ia3_weights,
                &[Ia3],
            ),
            (
                "rank_dropout",
                self.rank_dropout != d.rank_dropout,
                &[Loha, Lokr],
            ),
            (
                "module_dropout",
                self.module_dropout != d.module_dropout,
                &[Loha, Lokr],
            ),
            (
                "init_weights",
                self.init_weights != d.init_weights,
                &[Loha, Lokr, Vera],
            ),
            (
                "init_weights",
                self.init_weights == InitWeights::Lycoris,
                &[Lokr],
            ),
            ("decompose_both", self.decompose_both, &[Lokr]),
            (
                "decompose_factor",
                self.decompose_factor != d.decompose_factor,
                &[Lokr],
            ),
            ("rank_dropout_scale", self.rank_dropout_scale, &[Lokr]),
            ("loftq_iter", self.loftq_iter != d.loftq_iter, &[Lora]),
            (
                "projection_prng_key",
                self.projection_prng_key != d.projection_prng_key,
                &[Vera],
            ),
            ("save_projection", !self.save_projection, &[Vera]),
            ("vera_dropout", self.vera_dropout != d.vera_dropout, &[Vera]),
            ("d_initial", self.d_initial != d.d_initial, &[Vera]),
        ];
        if let Some((field, _, methods)) = settings
            .iter()
            .find(|(_, set, methods)| *set && !methods.contains(&self.peft_type))
        {
            let names: Vec<String> = methods
                .iter()
                .map(|m| format!("{m:?}").to_lowercase())
                .collect();
            return Err(InvalidSetting {
                field,
                problem: format!(
                    "applies to peft_type {}, not {}",
                    names.join(" or "),
                    format!("{:?}", self.peft_type).to_lowercase()
                ),
            });
        }
        let adapter = self.adapter_config(std::path::Path::new(""));
        let lycoris = match &adapter {
            AdapterConfig::Loha(c) => Some(&c.lycoris),
            AdapterConfig::Lokr(c) => Some(&c.lycoris),
            _ => None,
        };
        if let Some(Err(e)) = lycoris.map(|c| c.validate()) {
            return Err(InvalidSetting {
                field: if e.to_string().contains("module_dropout") {
                    "module_dropout"
                } else {
                    "rank_dropout"
                },
                problem: e.to_string(),
            });
        }
        if self.loftq_iter != d.loftq_iter
            && !matches!(self.lora.init_lora_weights, InitLoraWeights::Loftq { .. })
        {
            return Err(InvalidSetting {
                field: "loftq_iter",
                problem: "applies with init_lora_weights loftq".to_owned(),
            });
        }
        if self.loftq_iter == 0 {
            return Err(InvalidSetting {
                field: "loftq_iter",
                problem: "must be at least 1".to_owned(),
            });
        }
        if let AdapterConfig::Vera(c) = &adapter {
            if let Err(e) = c.validate() {
                let msg = e.to_string();
                return Err(InvalidSetting {
                    field: if msg.contains("d_initial") {
                        "d_initial"
                    } else {
                        "vera_dropout"
                    },
                    problem: msg,
                });
            }
        }
        if let AdapterConfig::Lokr(c) = &adapter {
            if c.decompose_factor == 0 || c.decompose_factor < -1 {
                return Err(InvalidSetting {
                    field: "decompose_factor",
                    problem: format!(
                        "must be -1 (near the square root) or a size >= 1, got {}",
                        c.decompose_factor
                    ),
                });
            }
        }
        if let AdapterConfig::Ia3(c) = adapter {
            if let Err(e) = c.validate() {
                let msg = e.to_string();
                return Err(InvalidSetting {
                    field: if msg.starts_with("`feedforward_modules`") {
                        "feedforward_modules"
                    } else {
                        "target_modules"
                    },
                    problem: msg,
                });
            }
        }
        Ok(())
    }

    /// Rejects settings that cannot work, naming the field. (A long
    /// function on purpose: one rule per setting, in the order of the
    /// settings, so that each rule is found next to its neighbours.)
    pub fn validate(&self) -> std::result::Result<(), InvalidSetting> {
        let check = |ok: bool, field: &'static str, problem: &str| {
            if ok {
                Ok(())
            } else {
                Err(InvalidSetting {
                    field,
                    problem: problem.to_owned(),
                })
            }
        };
        let finite = |x: f64| x.is_finite();
        // The adapter's own rules, under the settings' field names.
        if let Some((field, problem)) = self.lora.problem() {
            return Err(InvalidSetting {
                field: if field == "r" { "lora_rank" } else { field },
                problem,
            });
        }
        self.check_method_settings()?;
        check(
            self.neftune_noise_alpha >= 0.0 && finite(self.neftune_noise_alpha),
            "neftune_noise_alpha",
            "must be a finite number >= 0 (0 is off)",
        )?;
        check(
            self.per_device_train_batch_size > 0,
            "per_device_train_batch_size",
            "must be at least 1",
        )?;
        check(
            (1..=1024).contains(&self.nproc),
            "nproc",
            "must be between 1 and 1024",
        )?;
        check(
            self.dist_timeout > 0,
            "dist_timeout",
            "must be at least 1 second",
        )?;
        check(
            self.gradient_accumulation_steps > 0,
            "gradient_accumulation_steps",
            "must be at least 1",
        )?;
        check(
            self.learning_rate > 0.0 && finite(self.learning_rate),
            "learning_rate",
            "must be a finite number > 0",
        )?;
        check(
            self.weight_decay >= 0.0 && finite(self.weight_decay),
            "weight_decay",
            "must be a finite number >= 0",
        )?;
        check(
            self.loraplus_lr_ratio.is_none_or(|r| r > 0.0 && finite(r)),
            "loraplus_lr_ratio",
            "must be a finite number > 0",
        )?;
        check(
            self.loraplus_weight_decay >= 0.0 && finite(self.loraplus_weight_decay),
            "loraplus_weight_decay",
            "must be a finite number >= 0",
        )?;
        // PEFT's LoRA+ groups carry their own weight decay, so an
        // optimizer-wide one would be silently dropped there.
        check(
            self.loraplus_lr_ratio.is_none() || self.weight_decay == 0.0,
            "weight_decay",
            "does not apply with loraplus_lr_ratio (PEFT's LoRA+ groups use loraplus_weight_decay); set --loraplus-weight-decay instead",
        )?;
        check(
            self.loraplus_lr_ratio.is_some() || self.loraplus_weight_decay == 0.0,
            "loraplus_weight_decay",
            "applies only with loraplus_lr_ratio; use --weight-decay without LoRA+",
        )?;
        check(
            (0.0..1.0).contains(&self.adam_beta1),
            "adam_beta1",
            "must be in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&self.adam_beta2),
            "adam_beta2",
            "must be in [0, 1)",
        )?;
        check(
            self.adam_epsilon > 0.0 && finite(self.adam_epsilon),
            "adam_epsilon",
            "must be a finite number > 0",
        )?;
        check(
            (0.0..=1.0).contains(&self.warmup_ratio),
            "warmup_ratio",
            "must be in [0, 1]",
        )?;
        check(
            self.max_grad_norm >= 0.0 && finite(self.max_grad_norm),
            "max_grad_norm",
            "must be a finite number >= 0 (0 is off)",
        )?;
        check(
            finite(self.num_train_epochs) && self.num_train_epochs >= 0.0,
            "num_train_epochs",
            "must be a finite number >= 0",
        )?;
        check(
            self.num_train_epochs <= 1e6,
            "num_train_epochs",
            "must be at most 1000000",
        )?;
        check(
            self.max_steps > 0 || self.num_train_epochs > 0.0,
            "num_train_epochs",
            "must be > 0 when max_steps is 0",
        )?;
        check(
            self.max_steps <= 1 << 40,
            "max_steps",
            "must be at most 2^40",
        )?;
        check(
            self.max_seq_length >= 2,
            "max_seq_length",
            "must be at least 2",
        )?;
        check(
            self.max_seq_length <= 1 << 20,
            "max_seq_length",
            "must be at most 1048576",
        )?;
        check(
            self.loss_chunk_size > 0,
            "loss_chunk_size",
            "must be at least 1",
        )?;
        check(
            self.logging_steps > 0,
            "logging_steps",
            "must be at least 1",
        )?;
        check(
            !(self.quantize == Some(Quantize::Int8)
                && (self.bnb_4bit_use_double_quant || self.bnb_4bit_compute_dtype.is_some())),
            "bnb_4bit_use_double_quant",
            "and bnb_4bit_compute_dtype apply to 4-bit quantization (nf4, fp4), not int8",
        )?;
        check(
            self.quantize.is_some()
                || (!self.bnb_4bit_use_double_quant && self.bnb_4bit_compute_dtype.is_none()),
            "bnb_4bit_use_double_quant",
            "and bnb_4bit_compute_dtype need quantize (nf4 or fp4)",
        )?;
        // Keeping products is part of checkpointing, and the recompute
        // replays them against dense weights only.
        for (kept, name) in [
            (
                self.gradient_checkpointing_keep_mlp,
                "gradient_checkpointing_keep_mlp",
            ),
            (
                self.gradient_checkpointing_keep_attention,
                "gradient_checkpointing_keep_attention",
            ),
        ] {
            check(
                !kept || self.checkpointing(),
                name,
                "applies only with gradient checkpointing (without it every product is kept); \
                 add --gradient-checkpointing or drop this setting",
            )?;
            check(
                !kept || (self.quantize.is_none() && !self.fsdp),
                name,
                "keeps the products of dense weights, which neither --quantize nor --fsdp has; \
                 drop this setting",
            )?;
        }
        Ok(())
    }
}
