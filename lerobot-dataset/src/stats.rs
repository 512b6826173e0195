//! Feature statistics as LeRobot keeps them (`compute_stats.py`): per episode (`min`, `max`,
//! `mean`, population `std`, `count`, quantiles `q01…q99`) and their aggregate (`stats.json`).
//!
//! Vectors are per element; cameras per RGB channel on a 0–1 scale, stored with shape `[3, 1, 1]`.
//! Quantiles here are exact (linear interpolation, numpy's default); LeRobot estimates them from a
//! 5000-bin histogram, so they agree to within a bin width. Aggregation uses LeRobot's formulas:
//! count-weighted means, pooled std, and count-weighted averages of the per-episode quantiles.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// `DEFAULT_QUANTILES` and their stat names.
pub const QUANTILES: [(&str, f64); 5] = [
    ("q01", 0.01),
    ("q10", 0.10),
    ("q50", 0.50),
    ("q90", 0.90),
    ("q99", 0.99),
];

/// Statistics of one feature.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    pub min: Vec<f64>,
    pub max: Vec<f64>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub count: u64,
    /// `q01` … `q99` (absent in converted / older datasets).
    pub quantiles: BTreeMap<String, Vec<f64>>,
    /// Camera stats are written as `[[[r]], [[g]], [[b]]]`.
    pub camera: bool,
}

/// `{feature: stats}`.
pub type Stats = BTreeMap<String, FeatureStats>;

impl FeatureStats {
    /// Stats of `samples` (each a flattened per-frame vector of the same length `dim`).
    pub fn compute(samples: &[Vec<f64>], camera: bool) -> Option<FeatureStats> {
        let dim = samples.first()?.len();
        let n = samples.len() as f64;
        let mut st = FeatureStats {
            min: vec![f64::INFINITY; dim],
            max: vec![f64::NEG_INFINITY; dim],
            mean: vec![0.0; dim],
            std: vec![0.0; dim],
            count: samples.len() as u64,
            quantiles: BTreeMap::new(),
            camera,
        };
        for s in samples {
            for (d, &x) in s.iter().enumerate().take(dim) {
                st.min[d] = st.min[d].min(x);
                st.max[d] = st.max[d].max(x);
                st.mean[d] += x / n;
            }
        }
        for s in samples {
            for (d, &x) in s.iter().enumerate().take(dim) {
                st.std[d] += (x - st.mean[d]).powi(2) / n;
            }
        }
        st.std.iter_mut().for_each(|v| *v = v.sqrt());
        for (name, q) in QUANTILES {
            let vals = (0..dim)
                .map(|d| {
                    let mut col: Vec<f64> = samples.iter().map(|s| s[d]).collect();
                    col.sort_by(f64::total_cmp);
                    if col.len() < 2 {
                        return st.mean[d];
                    }
                    let pos = q * (col.len() - 1) as f64;
                    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
                    col[lo] + (col[(lo + 1).min(col.len() - 1)] - col[lo]) * frac
                })
                .collect();
            st.quantiles.insert(name.to_string(), vals);
        }
        Some(st)
    }

    /// Per-channel stats of RGB frames, scaled to 0–1 (LeRobot's image stats).
    pub fn compute_rgb(frames: &[&image::RgbImage]) -> Option<FeatureStats> {
        // Each pixel is one sample of a 3-vector; count is the number of frames, like LeRobot.
        let samples: Vec<Vec<f64>> = frames
            .iter()
            .flat_map(|f| {
                f.pixels()
                    .map(|p| p.0.iter().map(|&c| f64::from(c) / 255.0).collect())
            })
            .collect();
        let mut st = FeatureStats::compute(&samples, true)?;
        st.count = frames.len() as u64;
        Some(st)
    }

    fn shape(&self, v: &[f64]) -> Value {
        if self.camera {
            Value::Array(v.iter().map(|x| json!([[x]])).collect())
        } else {
            json!(v)
        }
    }

    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("min".into(), self.shape(&self.min));
        m.insert("max".into(), self.shape(&self.max));
        m.insert("mean".into(), self.shape(&self.mean));
        m.insert("std".into(), self.shape(&self.std));
        m.insert("count".into(), json!([self.count]));
        for (k, v) in &self.quantiles {
            m.insert(k.clone(), self.shape(v));
        }
        Value::Object(m)
    }

    /// Parses `{stat: nested list}` (stats.json, episodes_stats.jsonl, `stats/*` columns).
    pub fn from_json(v: &Value) -> Option<FeatureStats> {
        fn flat(v: &Value, out: &mut Vec<f64>) {
            match v {
                Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
                x => out.extend(x.as_f64()),
            }
        }
        let get = |k: &str| -> Option<Vec<f64>> {
            let mut out = Vec::new();
            flat(v.get(k)?, &mut out);
            Some(out)
        };
        let camera = matches!(v.get("mean"), Some(Value::Array(a)) if a.first().is_some_and(Value::is_array));
        let count = get("count")?.first().copied()? as u64;
        let quantiles = QUANTILES
            .iter()
            .filter_map(|(k, _)| Some((k.to_string(), get(k)?)))
            .collect();
        Some(FeatureStats {
            min: get("min")?,
            max: get("max")?,
            mean: get("mean")?,
            std: get("std")?,
            count,
            quantiles,
            camera,
        })
    }
}

/// `aggregate_feature_stats`: combines per-episode stats of one feature.
pub fn aggregate_feature(parts: &[&FeatureStats]) -> Option<FeatureStats> {
    let first = parts.first()?;
    let dim = first.mean.len();
    let total: f64 = parts.iter().map(|p| p.count as f64).sum();
    let mut out = FeatureStats {
        min: first.min.clone(),
        max: first.max.clone(),
        mean: vec![0.0; dim],
        std: vec![0.0; dim],
        count: total as u64,
        quantiles: BTreeMap::new(),
        camera: first.camera,
    };
    for p in parts {
        let w = p.count as f64 / total;
        for d in 0..dim {
            out.min[d] = out.min[d].min(p.min[d]);
            out.max[d] = out.max[d].max(p.max[d]);
            out.mean[d] += w * p.mean[d];
        }
    }
    for p in parts {
        let w = p.count as f64 / total;
        for d in 0..dim {
            out.std[d] += w * (p.std[d].powi(2) + (p.mean[d] - out.mean[d]).powi(2));
        }
    }
    out.std.iter_mut().for_each(|v| *v = v.sqrt());
    // Quantiles only when every part has them.
    for (k, _) in QUANTILES {
        if parts.iter().all(|p| p.quantiles.contains_key(k)) {
            let mut q = vec![0.0; dim];
            for p in parts {
                let w = p.count as f64 / total;
                for (d, x) in p.quantiles[k].iter().enumerate().take(dim) {
                    q[d] += w * x;
                }
            }
            out.quantiles.insert(k.to_string(), q);
        }
    }
    Some(out)
}

/// `aggregate_stats`: combines per-episode stats of every feature.
pub fn aggregate(parts: &[&Stats]) -> Stats {
    let mut keys: Vec<&String> = parts.iter().flat_map(|s| s.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let ps: Vec<&FeatureStats> = parts.iter().filter_map(|s| s.get(k)).collect();
            Some((k.clone(), aggregate_feature(&ps)?))
        })
        .collect()
}

/// Stats as the `stats.json` object.
pub fn to_json(stats: &Stats) -> Value {
    Value::Object(
        stats
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect(),
    )
}

/// Parses a `{feature: {stat: …}}` JSON object (features that do not parse are skipped).
pub fn from_json(v: &Value) -> Stats {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, s)| Some((k.clone(), FeatureStats::from_json(s)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// LeRobot's `sample_indices` as a stride: every frame below 100, else about `len^0.75`
/// (100..10000) evenly spaced. Camera stats are computed on frames `0, step, 2·step, …`.
pub fn sample_step(len: usize) -> usize {
    if len < 100 {
        return 1;
    }
    let n = ((len as f64).powf(0.75) as usize).clamp(100, 10_000);
    (len / n).max(1)
}
