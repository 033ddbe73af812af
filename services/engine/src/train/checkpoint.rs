//! Training checkpoints: a directory `checkpoint-<step>` holding the trainable tensors
//! (`trainable.safetensors`), the optimizer state (`optimizer.safetensors`) and `state.json`.
//!
//! All randomness of a step is derived from `(seed, step)` (see [`super::rng`]), so the seed and
//! the step are the whole generator state; a resumed run repeats an uninterrupted one exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::TrainError;

pub const TRAINABLE_FILE: &str = "trainable.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
const FORMAT_VERSION: u32 = 1;

/// Contents of `state.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Seed of the run (with `step`, the complete generator state).
    pub seed: u64,
    /// Training method settings; a resume with different settings is refused.
    pub method: serde_json::Value,
    /// Settings that change the random stream or the data; must match on resume.
    pub fingerprint: serde_json::Value,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: CheckpointState,
    pub trainable: BTreeMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

pub fn dir_name(step: u64) -> String {
    format!("checkpoint-{step:08}")
}

fn step_of(dir: &Path) -> Option<u64> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("checkpoint-")?
        .parse()
        .ok()
}

/// Writes a checkpoint for `state.step` under `root` atomically (written to a temporary
/// directory, then renamed). Returns its directory.
pub fn save(
    root: &Path,
    state: &CheckpointState,
    trainable: &BTreeMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(root)?;
    let final_dir = root.join(dir_name(state.step));
    let tmp = root.join(format!(".{}.tmp", dir_name(state.step)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let mut md = BTreeMap::new();
    md.insert("step".to_string(), state.step.to_string());
    super::io::save(&tmp.join(TRAINABLE_FILE), trainable, &md)?;
    let opt: BTreeMap<String, Tensor> = optimizer
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    super::io::save(&tmp.join(OPTIMIZER_FILE), &opt, &md)?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Format(e.to_string()))?;
    std::fs::write(tmp.join(STATE_FILE), json)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)?;
    Ok(final_dir)
}

/// Checkpoint directories under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, TrainError> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.join(STATE_FILE).is_file())
        .filter_map(|p| step_of(&p).map(|s| (s, p)))
        .collect();
    out.sort();
    Ok(out)
}

/// The newest checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>, TrainError> {
    Ok(list(root)?.pop().map(|(_, p)| p))
}

/// Removes all but the newest `keep` checkpoints.
pub fn prune(root: &Path, keep: usize) -> Result<(), TrainError> {
    let all = list(root)?;
    let n = all.len().saturating_sub(keep);
    for (_, p) in all.into_iter().take(n) {
        std::fs::remove_dir_all(p)?;
    }
    Ok(())
}

/// Loads a checkpoint directory.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint, TrainError> {
    let bytes = std::fs::read(dir.join(STATE_FILE))
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.join(STATE_FILE).display())))?;
    let state: CheckpointState = serde_json::from_slice(&bytes)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.display())))?;
    if state.format_version != FORMAT_VERSION {
        return Err(TrainError::Checkpoint(format!(
            "{}: format version {} (expected {FORMAT_VERSION})",
            dir.display(),
            state.format_version
        )));
    }
    let (trainable, _) = super::io::load(&dir.join(TRAINABLE_FILE), device)?;
    let (opt, _) = super::io::load(&dir.join(OPTIMIZER_FILE), device)?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        trainable,
        optimizer: opt.into_iter().collect(),
    })
}

impl CheckpointState {
    pub fn new(
        step: u64,
        seed: u64,
        method: serde_json::Value,
        fingerprint: serde_json::Value,
        last_loss: Option<f64>,
    ) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            step,
            seed,
            method,
            fingerprint,
            last_loss,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_list_latest_prune_load() {
        let dev = Device::Cpu;
        let root = std::env::temp_dir().join(format!("sidbooth-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let w = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        let trainable = BTreeMap::from([("w".to_string(), w.clone())]);
        let opt = HashMap::from([("w.exp_avg".to_string(), w.clone())]);
        for step in [3u64, 6, 9] {
            let st = CheckpointState::new(
                step,
                5,
                serde_json::json!({"m": 1}),
                serde_json::json!({}),
                Some(0.5),
            );
            save(&root, &st, &trainable, &opt).unwrap();
        }
        assert_eq!(
            list(&root)
                .unwrap()
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>(),
            vec![3, 6, 9]
        );
        // an unfinished (temporary) directory is ignored
        std::fs::create_dir_all(root.join(".checkpoint-00000012.tmp")).unwrap();
        let last = latest(&root).unwrap().unwrap();
        assert!(last.ends_with(dir_name(9)));
        prune(&root, 2).unwrap();
        assert_eq!(list(&root).unwrap().len(), 2);
        let ck = load(&last, &dev).unwrap();
        assert_eq!(ck.state.step, 9);
        assert_eq!(ck.state.seed, 5);
        assert_eq!(ck.trainable["w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        assert!(ck.optimizer.contains_key("w.exp_avg"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
