//! `zk0-agent act --follow-global`: the inference worker follows the exports `zk0-agent run`
//! makes of each new global model (`<work_dir>/exports/current.json`, see
//! [`crate::federate::export`]).
//!
//! Before each chunk the worker calls [`Follow::poll`]: it reads the pointer (a small file) and,
//! when it names another export, starts loading that one on a loader thread while the current
//! policy keeps computing chunks; the first chunk after the load finished comes from the new
//! one. The control loop never waits (it only talks to the worker through its channels); the
//! loader competes with inference for the CPU, which the queue's `starved` count shows. An
//! export that fails to load, or does not fit the running loop, is counted and the old policy
//! kept; the same pointer is not retried until it changes.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};

use super::worker::ChunkSource;
use crate::federate::export::{Current, CURRENT};

/// Opens an export directory as a chunk source (or says why not).
pub type LoadFn = dyn Fn(&Path) -> Result<Box<dyn ChunkSource>, String> + Send + Sync;

/// What following did, for the act report.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FollowStats {
    /// The model of the policy in use (`None`: the export given at start, not a federated one).
    pub model_id: Option<String>,
    pub model_swaps: u64,
    /// Pointers that did not parse and exports that did not load or fit.
    pub swap_failures: u64,
}

/// The worker's view of `current.json`.
pub struct Follow {
    exports: PathBuf,
    /// The pointer's bytes last acted on.
    seen: Vec<u8>,
    /// The model id being loaded, and where the loader answers.
    loading: Option<(String, Receiver<Result<Box<dyn ChunkSource>, String>>)>,
    load: Arc<LoadFn>,
    stats: Arc<Mutex<FollowStats>>,
}

impl Follow {
    /// Follows `exports/current.json`; `model_id` is the model already running, if it came
    /// from there.
    pub fn new(exports: &Path, model_id: Option<String>, load: Arc<LoadFn>) -> Self {
        Self {
            exports: exports.to_path_buf(),
            seen: Vec::new(),
            loading: None,
            load,
            stats: Arc::new(Mutex::new(FollowStats {
                model_id,
                ..FollowStats::default()
            })),
        }
    }

    /// A handle on the counters, readable while the worker runs.
    pub fn stats(&self) -> Arc<Mutex<FollowStats>> {
        Arc::clone(&self.stats)
    }

    /// Between chunks: the newly loaded policy to use from now on, if one is ready.
    pub fn poll(&mut self) -> Option<Box<dyn ChunkSource>> {
        self.check_pointer();
        let result = match self.loading.as_ref()?.1.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => Err("the loader thread died".into()),
        };
        let (model_id, _) = self.loading.take()?;
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(source) => {
                tracing::info!(model = %model_id, "swapped in the new global model");
                st.model_id = Some(model_id);
                st.model_swaps += 1;
                Some(source)
            }
            Err(error) => {
                tracing::warn!(model = %model_id, %error, "the new export did not load; keeping the current policy");
                st.swap_failures += 1;
                None
            }
        }
    }

    /// Starts loading the export the pointer names, if it changed and names another model.
    fn check_pointer(&mut self) {
        let path = self.exports.join(CURRENT);
        let Ok(bytes) = std::fs::read(&path) else {
            return; // no export yet
        };
        if bytes == self.seen {
            return;
        }
        self.seen = bytes;
        let current: Current = match serde_json::from_slice(&self.seen) {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "unreadable export pointer");
                self.fail();
                return;
            }
        };
        let running = self
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .model_id
            .clone();
        if running.as_deref() == Some(current.model_id.as_str()) {
            self.loading = None; // back to the model running: a load under way is dropped
            return;
        }
        // A load still under way for an older pointer is abandoned (its result dropped).
        let (tx, rx) = mpsc::channel();
        let load = Arc::clone(&self.load);
        let dir = current.dir.clone();
        let spawned = std::thread::Builder::new()
            .name("export-loader".into())
            .spawn(move || {
                let _ = tx.send(load(&dir));
            });
        match spawned {
            Ok(_) => {
                tracing::info!(model = %current.model_id, dir = %current.dir.display(), "loading the new global model");
                self.loading = Some((current.model_id, rx));
            }
            Err(error) => {
                tracing::warn!(%error, "starting the export loader");
                self.fail();
            }
        }
    }

    fn fail(&self) {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .swap_failures += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::super::worker::tests::Ramp;
    use super::super::worker::{ObsRequest, OnnxSource, SourceSettings, Worker};
    use super::*;
    use crate::federate::export;
    use std::time::Duration;

    fn obs(tick: u64, frames: Vec<zk0_robot::camera::Frame>) -> ObsRequest {
        ObsRequest {
            tick,
            frames,
            state: vec![10.0; 6],
        }
    }

    /// Sends `o` and waits for its chunk.
    fn chunk(w: &Worker, o: ObsRequest) -> Vec<Vec<f32>> {
        w.try_send(o).unwrap();
        for _ in 0..2000 {
            if let Ok(r) = w.try_recv() {
                return r.actions.unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no chunk in 10 s");
    }

    /// Chunks until the swap counters reach `swaps` + `failures` (at most 10 s); the last one.
    fn chunk_until(
        w: &Worker,
        stats: &Mutex<FollowStats>,
        swaps: u64,
        failures: u64,
        o: impl Fn() -> ObsRequest,
    ) -> Vec<Vec<f32>> {
        for _ in 0..200 {
            let c = chunk(w, o());
            let s = stats.lock().unwrap().clone();
            if s.model_swaps >= swaps && s.swap_failures >= failures {
                return c;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the counters never reached {swaps} swaps, {failures} failures");
    }

    /// `<exports>/<id>.tmp` made by `fill`, installed as the current export.
    fn publish(exports: &Path, id: &str, round: u64, fill: impl FnOnce(&Path)) {
        let tmp = exports.join(format!("{id}.tmp"));
        std::fs::create_dir_all(&tmp).unwrap();
        fill(&tmp);
        export::install(exports, id, round).unwrap();
    }

    #[test]
    fn the_next_chunk_after_a_new_export_loads_comes_from_it_and_a_bad_one_is_kept_out() {
        let t = tempfile::tempdir().unwrap();
        let ex = t.path().join("exports");
        // Each "export" is a file naming its ramp step; "bad" has none.
        let step =
            |step: &'static str| move |d: &Path| std::fs::write(d.join("step"), step).unwrap();
        publish(&ex, "a", 1, step("1"));
        let load: Arc<LoadFn> = Arc::new(|dir: &Path| {
            let s = std::fs::read_to_string(dir.join("step")).map_err(|e| e.to_string())?;
            Ok(Box::new(Ramp {
                n: 2,
                step: s.trim().parse::<f32>().map_err(|e| e.to_string())?,
                delay: Duration::from_millis(5),
                nan_from: None,
            }) as Box<dyn ChunkSource>)
        });
        let first = load(&ex.join("a")).unwrap();
        let follow = Follow::new(&ex, Some("a".into()), load);
        let stats = follow.stats();
        let w = Worker::spawn_following(first, Some(follow)).unwrap();
        let o = || obs(0, vec![]);
        assert_eq!(chunk(&w, o())[0][0], 11.0);
        assert_eq!(chunk(&w, o())[0][0], 11.0, "the same pointer: no reload");
        publish(&ex, "b", 2, step("5"));
        assert_eq!(chunk_until(&w, &stats, 1, 0, o)[0][0], 15.0);
        publish(&ex, "bad", 3, |_| {});
        assert_eq!(chunk_until(&w, &stats, 1, 1, o)[0][0], 15.0, "b kept");
        std::fs::write(ex.join(CURRENT), b"garbage").unwrap();
        assert_eq!(chunk_until(&w, &stats, 1, 2, o)[0][0], 15.0);
        let s = stats.lock().unwrap().clone();
        assert_eq!(
            s,
            FollowStats {
                model_id: Some("b".into()),
                model_swaps: 1,
                swap_failures: 2
            }
        );
    }

    /// Copies the committed tiny export into `dst`.
    fn copy_fixture(dst: &Path) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smolvla-tiny-onnx");
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }

    /// Adds `shift` to the postprocessor's `action.mean`: every action moves by `shift`.
    fn shift_action_mean(dir: &Path, shift: f32) {
        use shared_proto::tensor::{read_safetensors, write_safetensors};
        let path = dir.join("policy_postprocessor_step_0_unnormalizer_processor.safetensors");
        let (mut set, meta) = read_safetensors(&std::fs::read(&path).unwrap()).unwrap();
        for v in &mut set.get_mut("action.mean").unwrap().data {
            *v += shift;
        }
        std::fs::write(&path, write_safetensors(&set, &meta)).unwrap();
    }

    #[test]
    fn a_real_export_is_swapped_in_between_chunks() {
        let Some(lib) = std::env::var_os("ORT_DYLIB_PATH") else {
            eprintln!("skipped: ORT_DYLIB_PATH is not set (onnxruntime)");
            return;
        };
        zk0_infer::init(Some(Path::new(&lib))).unwrap();
        let t = tempfile::tempdir().unwrap();
        let ex = t.path().join("exports");
        publish(&ex, "a", 1, copy_fixture);
        let a = export::read_current(&ex).unwrap().unwrap();
        let m = zk0_infer::OnnxPolicy::load(&a.dir, &Default::default())
            .unwrap()
            .manifest;
        let settings = SourceSettings {
            runtime: zk0_infer::RuntimeOptions {
                threads: Some(1),
                ..Default::default()
            },
            stats: None,
            tokenizer: None,
            task: "pick up the cube".into(),
            // The same noise for every chunk: chunks differ only by the model.
            noise: Some(vec![0.3; (m.chunk_size * m.max_action_dim) as usize]),
            seed: 0,
        };
        let load: Arc<LoadFn> = {
            let s = settings.clone();
            Arc::new(move |dir: &Path| {
                OnnxSource::open(dir, &s)
                    .map(|src| Box::new(src) as Box<dyn ChunkSource>)
                    .map_err(|e| e.to_string())
            })
        };
        let first = load(&a.dir).unwrap();
        let follow = Follow::new(&ex, Some("a".into()), load);
        let stats = follow.stats();
        let w = Worker::spawn_following(first, Some(follow)).unwrap();
        let (width, height) = (m.image.width as u32, m.image.height as u32);
        let frame = zk0_robot::camera::Frame {
            index: 0,
            captured: std::time::Instant::now(),
            width,
            height,
            rgb: Arc::new((0..width * height * 3).map(|i| (i % 251) as u8).collect()),
        };
        let o = || obs(0, vec![frame.clone(); m.cameras.len()]);
        let from_a = chunk(&w, o());
        publish(&ex, "b", 2, |d| {
            copy_fixture(d);
            shift_action_mean(d, 10.0);
        });
        let from_b = chunk_until(&w, &stats, 1, 0, o);
        assert_eq!(from_a.len(), from_b.len());
        for (x, y) in from_a.iter().flatten().zip(from_b.iter().flatten()) {
            assert!((y - x - 10.0).abs() < 1e-3, "{x} then {y}");
        }
        // An export that does not load keeps b.
        publish(&ex, "broken", 3, |d| {
            std::fs::write(d.join("export.json"), b"{}").unwrap()
        });
        let still_b = chunk_until(&w, &stats, 1, 1, o);
        assert_eq!(still_b, from_b);
        assert_eq!(stats.lock().unwrap().model_id.as_deref(), Some("b"));
    }
}
