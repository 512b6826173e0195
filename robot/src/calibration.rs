//! LeRobot's calibration files: `<dir>/<id>.json`, a JSON object keyed by motor name in motor
//! order, each `{id, drive_mode, homing_offset, range_min, range_max}`, written as draccus
//! writes it (4-space indent, no trailing newline) so files round-trip byte for byte.
//!
//! Default directory, as LeRobot 0.6.1 resolves it (`utils/constants.py` and huggingface_hub):
//! `$HF_LEROBOT_CALIBRATION`, else `$HF_LEROBOT_HOME/calibration`, else
//! `$HF_HOME/lerobot/calibration`, else `$XDG_CACHE_HOME/huggingface/lerobot/calibration`, else
//! `~/.cache/huggingface/lerobot/calibration`; then `robots/so_follower/` or
//! `teleoperators/so_leader/`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One motor's calibration (LeRobot's `MotorCalibration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MotorCalibration {
    pub id: u8,
    pub drive_mode: u8,
    pub homing_offset: i64,
    pub range_min: i64,
    pub range_max: i64,
}

/// A whole arm's calibration, in motor order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Calibration {
    pub motors: Vec<(String, MotorCalibration)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a LeRobot calibration file: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: no entry for motor {motor}", path.display())]
    MissingMotor { path: PathBuf, motor: String },
    #[error("{}: motor {motor} has id {found}, this arm has it at id {expected}", path.display())]
    WrongId {
        path: PathBuf,
        motor: String,
        expected: u8,
        found: u8,
    },
    #[error(
        "no calibration directory: set HF_LEROBOT_CALIBRATION, HF_LEROBOT_HOME, HF_HOME or HOME"
    )]
    NoHome,
}

impl Calibration {
    pub fn get(&self, motor: &str) -> Option<&MotorCalibration> {
        self.motors.iter().find(|(m, _)| m == motor).map(|(_, c)| c)
    }

    /// The file's text, exactly as LeRobot's `draccus.dump(..., indent=4)` writes it.
    pub fn to_json(&self) -> String {
        // serde_json's map is sorted (no `preserve_order`); written by hand, the motors keep the
        // arm's order, as in LeRobot's files.
        let mut out = String::from("{\n");
        for (i, (name, c)) in self.motors.iter().enumerate() {
            let key = serde_json::to_string(name).unwrap_or_default();
            out.push_str(&format!(
                "    {key}: {{\n        \"id\": {},\n        \"drive_mode\": {},\n        \"homing_offset\": {},\n        \"range_min\": {},\n        \"range_max\": {}\n    }}",
                c.id, c.drive_mode, c.homing_offset, c.range_min, c.range_max
            ));
            out.push_str(if i + 1 < self.motors.len() {
                ",\n"
            } else {
                "\n"
            });
        }
        out.push('}');
        out
    }

    /// Parses a file's text, keeping the entries of `motors` in that order (other keys are
    /// ignored, as LeRobot only looks up its own motors).
    pub fn from_json(
        text: &str,
        motors: &[(&str, u8)],
        path: &Path,
    ) -> Result<Self, CalibrationError> {
        let map: std::collections::BTreeMap<String, MotorCalibration> = serde_json::from_str(text)
            .map_err(|source| CalibrationError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        let mut out = Vec::with_capacity(motors.len());
        for (name, id) in motors {
            let c = map
                .get(*name)
                .ok_or_else(|| CalibrationError::MissingMotor {
                    path: path.to_path_buf(),
                    motor: name.to_string(),
                })?;
            if c.id != *id {
                return Err(CalibrationError::WrongId {
                    path: path.to_path_buf(),
                    motor: name.to_string(),
                    expected: *id,
                    found: c.id,
                });
            }
            out.push((name.to_string(), *c));
        }
        Ok(Self { motors: out })
    }

    pub fn load(path: &Path, motors: &[(&str, u8)]) -> Result<Self, CalibrationError> {
        let text = std::fs::read_to_string(path).map_err(|source| CalibrationError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, motors, path)
    }

    /// Writes the file (parent directories created), via a temporary file and a rename so a
    /// crash never leaves half a calibration behind.
    pub fn save(&self, path: &Path) -> Result<(), CalibrationError> {
        let io = |source| CalibrationError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, self.to_json()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

fn expand_home(p: &str, home: Option<&str>) -> PathBuf {
    match (p.strip_prefix("~/"), home) {
        (Some(rest), Some(h)) => Path::new(h).join(rest),
        _ if p == "~" && home.is_some() => PathBuf::from(home.unwrap_or_default()),
        _ => PathBuf::from(p),
    }
}

/// LeRobot's `HF_LEROBOT_CALIBRATION` from an environment lookup (pure, for tests).
pub fn calibration_root_with(
    env: impl Fn(&str) -> Option<String>,
) -> Result<PathBuf, CalibrationError> {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    let home = get("HOME");
    let home = home.as_deref();
    if let Some(c) = get("HF_LEROBOT_CALIBRATION") {
        return Ok(expand_home(&c, home));
    }
    if let Some(h) = get("HF_LEROBOT_HOME") {
        return Ok(expand_home(&h, home).join("calibration"));
    }
    let hf_home = match (get("HF_HOME"), get("XDG_CACHE_HOME")) {
        (Some(h), _) => expand_home(&h, home),
        (None, Some(x)) => expand_home(&x, home).join("huggingface"),
        (None, None) => Path::new(home.ok_or(CalibrationError::NoHome)?).join(".cache/huggingface"),
    };
    Ok(hf_home.join("lerobot").join("calibration"))
}

/// [`calibration_root_with`] over this process's environment.
pub fn calibration_root() -> Result<PathBuf, CalibrationError> {
    calibration_root_with(|k| std::env::var(k).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn root_follows_lerobots_precedence() {
        let r = |p: &[(&str, &str)]| calibration_root_with(env(p)).unwrap();
        assert_eq!(
            r(&[("HOME", "/h")]),
            Path::new("/h/.cache/huggingface/lerobot/calibration")
        );
        assert_eq!(
            r(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]),
            Path::new("/x/huggingface/lerobot/calibration")
        );
        assert_eq!(
            r(&[
                ("HOME", "/h"),
                ("XDG_CACHE_HOME", "/x"),
                ("HF_HOME", "~/hf")
            ]),
            Path::new("/h/hf/lerobot/calibration")
        );
        assert_eq!(
            r(&[("HF_HOME", "/hf"), ("HF_LEROBOT_HOME", "/lr")]),
            Path::new("/lr/calibration")
        );
        assert_eq!(
            r(&[("HF_LEROBOT_HOME", "/lr"), ("HF_LEROBOT_CALIBRATION", "/c")]),
            Path::new("/c")
        );
        assert!(matches!(
            calibration_root_with(env(&[])),
            Err(CalibrationError::NoHome)
        ));
    }
}
