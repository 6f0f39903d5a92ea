//! Models and adapters named by Hugging Face Hub id (`ORG/NAME[@REVISION]`),
//! as every Python tool accepts them: found in the Hugging Face cache as
//! `huggingface_hub` lays it out, and downloaded into it by Hugging Face's own
//! Rust client (`hf-hub`) when missing and online.
//!
//! The cache layout: `CACHE/models--ORG--NAME/refs/REVISION` holds a commit
//! hash; `snapshots/COMMIT/` holds the files (symlinks into `blobs/`). The
//! cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
//! `HF_HUB_OFFLINE=1` never touches the network. A local path of the same
//! name always wins.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// What a Hub repository is expected to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    /// A model: config.json, safetensors weights (one file or an index and
    /// its shards), tokenizer.json.
    Model,
    /// A PEFT adapter: adapter_config.json and adapter_model.safetensors.
    Adapter,
}

impl RepoKind {
    fn what(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Adapter => "adapter",
        }
    }

    /// Whether a repository file is one peft-rs reads (top-level
    /// configuration, tokenizer, template and safetensors files; not other
    /// weight formats, nor the subfolders some repositories carry).
    fn wants(self, file: &str) -> bool {
        if file.contains('/') {
            return false;
        }
        match self {
            RepoKind::Model => {
                file.ends_with(".json")
                    || file.ends_with(".safetensors")
                    || file.ends_with(".jinja")
                    || file == "tokenizer.model"
            }
            RepoKind::Adapter => file.ends_with(".json") || file.ends_with(".safetensors"),
        }
    }
}

/// A parsed `ORG/NAME[@REVISION]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    /// `ORG/NAME`.
    pub repo: String,
    /// A branch, tag or commit hash; `main` when not given.
    pub revision: String,
}

impl HubId {
    /// Parses `ORG/NAME` or `ORG/NAME@REVISION`; `None` for anything else
    /// (absolute paths, `./x`, more than one slash, characters the Hub
    /// does not allow in names).
    pub fn parse(s: &str) -> Option<Self> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => return None,
            None => (s, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        let ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (ok(org) && ok(name)).then(|| Self {
            repo: repo.to_owned(),
            revision: revision.to_owned(),
        })
    }

    /// The repository's folder in the cache, `models--ORG--NAME`.
    pub fn folder(&self, cache: &Path) -> PathBuf {
        cache.join(format!("models--{}", self.repo.replace('/', "--")))
    }
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, `$HF_HOME/hub`,
/// `$XDG_CACHE_HOME/huggingface/hub` or `~/.cache/huggingface/hub`,
/// as `huggingface_hub` decides it.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(c) = var("HF_HUB_CACHE") {
        return PathBuf::from(c);
    }
    let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
        var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(var("HOME").unwrap_or_else(|| ".".into())).join(".cache")
            })
            .join("huggingface")
    });
    home.join("hub")
}

/// `HF_HUB_OFFLINE` (or transformers' `TRANSFORMERS_OFFLINE`) set to a true value.
pub fn offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|k| {
        std::env::var(k).is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
    })
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The snapshot folder of `id` in `cache`, if its revision is known there:
/// a commit hash names its folder directly, a branch or tag through `refs/`.
pub fn snapshot_dir(cache: &Path, id: &HubId) -> Option<PathBuf> {
    let folder = id.folder(cache);
    let commit = if is_commit_hash(&id.revision) {
        id.revision.clone()
    } else {
        std::fs::read_to_string(folder.join("refs").join(&id.revision))
            .ok()?
            .trim()
            .to_owned()
    };
    let dir = folder.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// The files a usable `kind` lacks in `dir` (a symlink to a missing blob
/// counts as missing).
pub fn missing_files(dir: &Path, kind: RepoKind) -> Vec<String> {
    let absent = |f: &str| !dir.join(f).exists();
    let mut missing: Vec<String> = Vec::new();
    match kind {
        RepoKind::Adapter => {
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                if absent(f) {
                    missing.push(f.into());
                }
            }
        }
        RepoKind::Model => {
            for f in ["config.json", "tokenizer.json"] {
                if absent(f) {
                    missing.push(f.into());
                }
            }
            let index = dir.join("model.safetensors.index.json");
            match std::fs::read_to_string(&index) {
                Ok(text) => {
                    let shards: std::collections::BTreeSet<String> =
                        serde_json::from_str::<serde_json::Value>(&text)
                            .ok()
                            .and_then(|v| {
                                v["weight_map"].as_object().map(|m| {
                                    m.values()
                                        .filter_map(|s| s.as_str().map(str::to_owned))
                                        .collect()
                                })
                            })
                            .unwrap_or_default();
                    missing.extend(shards.into_iter().filter(|s| absent(s)));
                }
                Err(_) if absent("model.safetensors") => missing.push("model.safetensors".into()),
                Err(_) => {}
            }
        }
    }
    missing
}

/// `arg` as given when it is a local path (a local folder of the same name
/// wins) or not a Hub id; else the snapshot folder of the Hub id, from the
/// cache or, online, downloaded into it.
pub fn resolve(arg: &Path, kind: RepoKind) -> Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let Some(id) = arg.to_str().and_then(HubId::parse) else {
        return Ok(arg.to_path_buf());
    };
    let cache = cache_dir();
    let cached = snapshot_dir(&cache, &id);
    let missing = cached
        .as_deref()
        .map(|d| missing_files(d, kind))
        .unwrap_or_default();
    if let Some(dir) = cached.as_ref().filter(|_| missing.is_empty()) {
        return Ok(dir.clone());
    }
    let lacking = match missing.is_empty() {
        true => String::new(),
        false => format!(" (its snapshot lacks {})", missing.join(", ")),
    };
    let not_found = format!(
        "{}: no such local folder, and the {} {}@{} is not in the Hugging Face cache at {}{lacking}",
        arg.display(),
        kind.what(),
        id.repo,
        id.revision,
        id.folder(&cache).display()
    );
    if offline() {
        bail!(
            "{not_found}; HF_HUB_OFFLINE is set, so nothing is downloaded (unset it, or fetch it with `hf download {}`)",
            id.repo
        );
    }
    download(&id, kind, &cache)
        .map_err(|e| anyhow::anyhow!("{not_found}; downloading it failed: {e:#}"))
}

/// Downloads the files of `id` that peft-rs reads into `cache` with
/// `hf-hub` (a progress bar per file on a terminal), and returns the snapshot.
fn download(id: &HubId, kind: RepoKind, cache: &Path) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};

    let mut builder = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_retries(2);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_owned());
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build()?;
    let repo = api.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision.clone(),
    ));
    let info = repo.info()?;
    // Files go into the snapshot of the commit the revision names now; those
    // already there are kept (a partly downloaded model resumes), and files of
    // an older snapshot of the same branch are not mixed in.
    let dir = id.folder(cache).join("snapshots").join(&info.sha);
    for f in info.siblings.iter().map(|s| &s.rfilename) {
        if kind.wants(f) && !dir.join(f).exists() {
            eprintln!("downloading {}/{f}", id.repo);
            repo.download(f)?;
        }
    }
    if !dir.is_dir() {
        bail!(
            "the repository holds none of the files a {} needs",
            kind.what()
        );
    }
    let missing = missing_files(&dir, kind);
    if !missing.is_empty() {
        bail!(
            "the repository lacks {} (peft-rs reads safetensors weights)",
            missing.join(", ")
        );
    }
    Ok(dir)
}

/// The Hub id a snapshot folder of the cache was downloaded from
/// (`.../models--ORG--NAME/snapshots/COMMIT` gives `ORG/NAME`), as PEFT
/// records a base loaded by id in `base_model_name_or_path`.
pub fn id_of_snapshot(dir: &Path) -> Option<String> {
    let snapshots = dir.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let folder = snapshots.parent()?.file_name()?.to_str()?;
    let (org, name) = folder.strip_prefix("models--")?.split_once("--")?;
    Some(format!("{org}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_leaves_paths_alone() {
        let id = HubId::parse("HuggingFaceTB/SmolLM2-135M-Instruct@v1.0").unwrap();
        assert_eq!(id.repo, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(id.revision, "v1.0");
        assert_eq!(HubId::parse("org/name").unwrap().revision, "main");
        for not_id in [
            "/abs/path",
            "./x/y",
            "a/b/c",
            "name",
            "org/",
            "../x",
            "a/b@",
            "o/n m",
        ] {
            assert_eq!(HubId::parse(not_id), None, "{not_id}");
        }
    }

    #[test]
    fn snapshot_folder_names_its_id() {
        let d = Path::new("/c/hub/models--Org--My-Model/snapshots/abc");
        assert_eq!(id_of_snapshot(d).as_deref(), Some("Org/My-Model"));
        assert_eq!(id_of_snapshot(Path::new("/x/models/y")), None);
    }
}
