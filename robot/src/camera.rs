//! Cameras: a [`Camera`] handle whose capture thread always holds the latest frame, over any
//! [`FrameSource`]; and [`TestPattern`], a source for machines without a camera whose frames
//! encode their own index and capture time ([`encode_pattern`] / [`decode_pattern`]).
//!
//! The handle follows LeRobot's `OpenCVCamera` (0.6.1): a background thread reads frame after
//! frame and keeps the newest with its capture time; the control loop peeks at it
//! ([`Camera::read_latest`], refused when older than a bound) or waits for one newer than the
//! last it took ([`Camera::wait_newer`]). It also keeps the last [`RECENT`] frames, so a loop
//! at the camera's rate can take them in order ([`Camera::next_frame`]): a tick that comes a
//! little late then gets the frame it would have had instead of skipping one. A source that
//! fails (a camera unplugged) ends the thread, and every later read returns
//! [`CameraError::Lost`] naming the camera.
//!
//! V4L2 is not here yet: the `v4l` crate's bindings need libclang at build time.
//!
//! ## The test pattern
//!
//! The image is an 8 × 8 grid of cells (the last row and column absorb the remainder), each
//! cell all white (bit 1) or all black (bit 0), read row by row, most significant bit first:
//! cells 0..32 are the low 32 bits of the frame index, cells 32..64 the capture time in
//! milliseconds since the camera started (low 32 bits). Large flat blocks survive lossy video
//! (AV1 at crf 30, yuv420p) intact; the decoder averages the middle half of each cell and
//! refuses a cell whose mean is neither dark nor bright, so a damaged frame is an error, never
//! a wrong index.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One captured frame: RGB bytes (row-major, 3 bytes a pixel), shared so peeking is cheap.
#[derive(Debug, Clone)]
pub struct Frame {
    /// 0 for the first frame the source delivered, then +1 per frame.
    pub index: u64,
    /// When the frame was captured (monotonic clock).
    pub captured: Instant,
    pub width: u32,
    pub height: u32,
    pub rgb: Arc<Vec<u8>>,
}

impl Frame {
    /// Time since capture.
    pub fn age(&self) -> Duration {
        self.captured.elapsed()
    }
}

/// What the capture thread reads from: a device, or a generator.
pub trait FrameSource: Send + 'static {
    /// `(width, height)` of every frame.
    fn size(&self) -> (u32, u32);
    /// Nominal frames per second.
    fn fps(&self) -> f64;
    /// Blocks until the next frame. `Err(reason)` means the camera is gone: the thread stops.
    fn grab(&mut self) -> Result<Frame, String>;
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CameraError {
    #[error("camera {camera}: lost: {reason}")]
    Lost { camera: String, reason: String },
    #[error("camera {camera}: no new frame within {waited_ms} ms")]
    Timeout { camera: String, waited_ms: u128 },
    #[error("camera {camera}: latest frame is {age_ms} ms old (limit {max_ms} ms)")]
    Stale {
        camera: String,
        age_ms: u128,
        max_ms: u128,
    },
    #[error("camera {camera}: {reason}")]
    Config { camera: String, reason: String },
    #[error("camera {camera}: frame {index} carries no readable test pattern: {reason}")]
    Pattern {
        camera: String,
        index: u64,
        reason: String,
    },
}

/// Frames kept for [`Camera::next_frame`]: how far a loop may fall behind without a drop.
pub const RECENT: usize = 3;

#[derive(Debug, Default)]
struct State {
    /// The newest frames, oldest first, at most [`RECENT`].
    recent: std::collections::VecDeque<Frame>,
    lost: Option<String>,
    frames: u64,
}

impl State {
    fn latest(&self) -> Option<&Frame> {
        self.recent.back()
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    new_frame: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running camera: its capture thread stops (and is joined) when the handle is dropped.
pub struct Camera {
    name: String,
    size: (u32, u32),
    fps: f64,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Camera {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Camera")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("fps", &self.fps)
            .finish_non_exhaustive()
    }
}

impl Camera {
    /// Starts the capture thread on `source`.
    pub fn start(name: &str, mut source: Box<dyn FrameSource>) -> Result<Self, CameraError> {
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (size, fps) = (source.size(), source.fps());
        let thread = {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            std::thread::Builder::new()
                .name(format!("camera-{name}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let got = source.grab();
                        let mut s = shared.lock();
                        match got {
                            Ok(frame) => {
                                s.frames += 1;
                                if s.recent.len() == RECENT {
                                    s.recent.pop_front();
                                }
                                s.recent.push_back(frame);
                            }
                            Err(reason) => {
                                s.lost = Some(reason);
                                drop(s);
                                shared.new_frame.notify_all();
                                return;
                            }
                        }
                        drop(s);
                        shared.new_frame.notify_all();
                    }
                })
                .map_err(|e| CameraError::Config {
                    camera: name.to_string(),
                    reason: format!("cannot start the capture thread: {e}"),
                })?
        };
        Ok(Self {
            name: name.to_string(),
            size,
            fps,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(width, height)`.
    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    pub fn fps(&self) -> f64 {
        self.fps
    }

    /// Frames captured so far.
    pub fn frames(&self) -> u64 {
        self.shared.lock().frames
    }

    fn lost(&self, reason: &str) -> CameraError {
        CameraError::Lost {
            camera: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    /// The newest frame, if younger than `max_age` (LeRobot's `read_latest(max_age_ms)`).
    pub fn read_latest(&self, max_age: Duration) -> Result<Frame, CameraError> {
        let s = self.shared.lock();
        if let Some(r) = &s.lost {
            return Err(self.lost(r));
        }
        let f = s.latest().cloned().ok_or_else(|| CameraError::Timeout {
            camera: self.name.clone(),
            waited_ms: 0,
        })?;
        if f.age() > max_age {
            return Err(CameraError::Stale {
                camera: self.name.clone(),
                age_ms: f.age().as_millis(),
                max_ms: max_age.as_millis(),
            });
        }
        Ok(f)
    }

    /// The newest frame with an index above `after` (any frame when `None`), waiting up to
    /// `timeout` for one to arrive.
    pub fn wait_newer(&self, after: Option<u64>, timeout: Duration) -> Result<Frame, CameraError> {
        self.wait(timeout, |s| {
            s.latest()
                .filter(|f| after.is_none_or(|a| f.index > a))
                .cloned()
        })
    }

    /// The frame after `after`: the oldest kept frame with a higher index (the newest when
    /// `after` is `None`), waiting up to `timeout` for one. Frames that fell out of the
    /// [`RECENT`] kept show as a gap in the indices.
    pub fn next_frame(&self, after: Option<u64>, timeout: Duration) -> Result<Frame, CameraError> {
        self.wait(timeout, |s| match after {
            None => s.latest().cloned(),
            Some(a) => s.recent.iter().find(|f| f.index > a).cloned(),
        })
    }

    fn wait(
        &self,
        timeout: Duration,
        pick: impl Fn(&State) -> Option<Frame>,
    ) -> Result<Frame, CameraError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.lock();
        loop {
            if let Some(f) = pick(&s) {
                return Ok(f);
            }
            if let Some(r) = &s.lost {
                return Err(self.lost(r));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CameraError::Timeout {
                    camera: self.name.clone(),
                    waited_ms: timeout.as_millis(),
                });
            }
            s = self
                .shared
                .new_frame
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Size, rate and fault of a [`TestPattern`].
#[derive(Debug, Clone, PartialEq)]
pub struct TestPatternConfig {
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    /// Delivers this many frames, then fails as an unplugged camera does (fault tests).
    pub fail_after: Option<u64>,
}

/// Generated frames at a fixed rate (frame `n` at `start + n / fps`), each carrying its index
/// and capture time as the grid described in the module doc.
#[derive(Debug)]
pub struct TestPattern {
    cfg: TestPatternConfig,
    start: Instant,
    next: u64,
}

/// The grid's size in cells, each way.
const GRID: u32 = 8;
/// The smallest side that leaves each cell a readable middle.
const MIN_SIDE: u32 = 4 * GRID;

impl TestPattern {
    pub fn new(cfg: TestPatternConfig) -> Result<Self, String> {
        if cfg.width < MIN_SIDE || cfg.height < MIN_SIDE {
            return Err(format!(
                "test pattern needs at least {MIN_SIDE}x{MIN_SIDE} pixels, got {}x{}",
                cfg.width, cfg.height
            ));
        }
        if !cfg.width.is_multiple_of(2) || !cfg.height.is_multiple_of(2) {
            // yuv420p, the dataset's pixel format, needs even sides.
            return Err(format!(
                "test pattern sides must be even, got {}x{}",
                cfg.width, cfg.height
            ));
        }
        if !(cfg.fps.is_finite() && cfg.fps > 0.0 && cfg.fps <= 1000.0) {
            return Err(format!(
                "test pattern fps must be in (0, 1000], got {}",
                cfg.fps
            ));
        }
        Ok(Self {
            cfg,
            start: Instant::now(),
            next: 0,
        })
    }
}

impl FrameSource for TestPattern {
    fn size(&self) -> (u32, u32) {
        (self.cfg.width, self.cfg.height)
    }

    fn fps(&self) -> f64 {
        self.cfg.fps
    }

    fn grab(&mut self) -> Result<Frame, String> {
        if self.cfg.fail_after.is_some_and(|n| self.next >= n) {
            return Err(format!(
                "device disappeared after {} frames (test pattern fail_after)",
                self.next
            ));
        }
        let due = self.start + Duration::from_secs_f64(self.next as f64 / self.cfg.fps);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let captured = Instant::now();
        let time_ms = (captured - self.start).as_millis() as u32;
        let index = self.next;
        self.next += 1;
        let (w, h) = (self.cfg.width, self.cfg.height);
        Ok(Frame {
            index,
            captured,
            width: w,
            height: h,
            rgb: Arc::new(encode_pattern(w, h, index as u32, time_ms)),
        })
    }
}

/// What a test-pattern frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatternCode {
    /// Low 32 bits of the frame index.
    pub index: u32,
    /// Capture time in ms since the camera started (low 32 bits).
    pub time_ms: u32,
}

/// Cell `(col, row)`'s pixel bounds `(x0, x1, y0, y1)`; the last ones take the remainder.
fn cell_bounds(w: u32, h: u32, col: u32, row: u32) -> (u32, u32, u32, u32) {
    let (cw, ch) = (w / GRID, h / GRID);
    let x1 = if col + 1 == GRID { w } else { (col + 1) * cw };
    let y1 = if row + 1 == GRID { h } else { (row + 1) * ch };
    (col * cw, x1, row * ch, y1)
}

fn bits(index: u32, time_ms: u32) -> u64 {
    (u64::from(index) << 32) | u64::from(time_ms)
}

/// The RGB bytes of a `w`×`h` test-pattern frame (sides of at least 32 pixels).
pub fn encode_pattern(w: u32, h: u32, index: u32, time_ms: u32) -> Vec<u8> {
    let code = bits(index, time_ms);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    for cell in 0..GRID * GRID {
        if (code >> (63 - cell)) & 1 == 0 {
            continue;
        }
        let (x0, x1, y0, y1) = cell_bounds(w, h, cell % GRID, cell / GRID);
        for y in y0..y1 {
            let row = ((y * w + x0) * 3) as usize..((y * w + x1) * 3) as usize;
            rgb[row].fill(255);
        }
    }
    rgb
}

/// Reads a test-pattern frame back (after video compression too); an error says which cell
/// is unreadable.
pub fn decode_pattern(w: u32, h: u32, rgb: &[u8]) -> Result<PatternCode, String> {
    if w < MIN_SIDE || h < MIN_SIDE || rgb.len() != (w * h * 3) as usize {
        return Err(format!(
            "{} bytes is not a {w}x{h} RGB frame of at least {MIN_SIDE}x{MIN_SIDE}",
            rgb.len()
        ));
    }
    let mut code = 0u64;
    for cell in 0..GRID * GRID {
        let (x0, x1, y0, y1) = cell_bounds(w, h, cell % GRID, cell / GRID);
        // The middle half of the cell: away from the ringing at its edges.
        let (qx, qy) = ((x1 - x0) / 4, (y1 - y0) / 4);
        let (mut sum, mut n) = (0u64, 0u64);
        for y in y0 + qy..y1 - qy {
            for x in x0 + qx..x1 - qx {
                let p = ((y * w + x) * 3) as usize;
                sum += rgb[p..p + 3].iter().map(|&c| u64::from(c)).sum::<u64>();
                n += 3;
            }
        }
        let mean = sum as f64 / n.max(1) as f64;
        let bit = if mean >= 160.0 {
            1
        } else if mean <= 96.0 {
            0
        } else {
            return Err(format!(
                "cell {cell} has mean {mean:.1}, neither dark nor bright"
            ));
        };
        code = (code << 1) | bit;
    }
    Ok(PatternCode {
        index: (code >> 32) as u32,
        time_ms: code as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(w: u32, h: u32, fps: f64, fail_after: Option<u64>) -> TestPattern {
        TestPattern::new(TestPatternConfig {
            width: w,
            height: h,
            fps,
            fail_after,
        })
        .unwrap()
    }

    #[test]
    fn pattern_round_trips_at_odd_sizes_and_under_noise() {
        for (w, h) in [(32, 32), (160, 120), (642, 482)] {
            for (i, t) in [(0, 0), (1, 33), (0xDEAD_BEEF, 0x1234_5678), (u32::MAX, 7)] {
                let mut rgb = encode_pattern(w, h, i, t);
                // Noise of up to ±60 on every byte.
                for (k, b) in rgb.iter_mut().enumerate() {
                    let n = (k * 7919 % 121) as i32 - 60;
                    *b = (i32::from(*b) + n).clamp(0, 255) as u8;
                }
                let code = decode_pattern(w, h, &rgb).unwrap();
                assert_eq!((code.index, code.time_ms), (i, t), "{w}x{h}");
            }
        }
    }

    #[test]
    fn damaged_frame_is_an_error_not_a_wrong_index() {
        let mut rgb = encode_pattern(64, 64, 5, 9);
        rgb.fill(128);
        let e = decode_pattern(64, 64, &rgb).unwrap_err();
        assert!(e.contains("cell 0"), "{e}");
        assert!(decode_pattern(64, 64, &rgb[..10]).is_err());
        assert!(decode_pattern(16, 16, &[0; 16 * 16 * 3]).is_err());
    }

    #[test]
    fn bad_sizes_and_rates_are_refused() {
        for (w, h, fps) in [
            (16, 64, 30.0),
            (64, 63, 30.0),
            (64, 64, 0.0),
            (64, 64, f64::NAN),
        ] {
            let cfg = TestPatternConfig {
                width: w,
                height: h,
                fps,
                fail_after: None,
            };
            assert!(TestPattern::new(cfg).is_err(), "{w}x{h} at {fps}");
        }
    }

    #[test]
    fn capture_thread_keeps_the_latest_frame_and_waits_for_newer() {
        let cam = Camera::start("front", Box::new(pattern(64, 48, 50.0, None))).unwrap();
        let a = cam.wait_newer(None, Duration::from_secs(2)).unwrap();
        let b = cam
            .wait_newer(Some(a.index), Duration::from_secs(2))
            .unwrap();
        assert!(b.index > a.index);
        assert!(b.captured > a.captured);
        let code = decode_pattern(b.width, b.height, &b.rgb).unwrap();
        assert_eq!(u64::from(code.index), b.index);
        // Frame n is due at n / fps: never earlier, later only by scheduling slack.
        let due_ms = b.index as f64 * 20.0;
        let t = f64::from(code.time_ms);
        assert!(t >= due_ms - 1.0 && t < due_ms + 100.0, "{code:?}");
        assert_eq!(cam.read_latest(Duration::from_secs(1)).unwrap().width, 64);
        std::thread::sleep(Duration::from_millis(100));
        assert!(cam.frames() >= 4, "{} frames", cam.frames());
    }

    #[test]
    fn next_frame_takes_frames_in_order_and_a_long_lag_shows_as_a_gap() {
        let cam = Camera::start("front", Box::new(pattern(32, 32, 100.0, None))).unwrap();
        let t = Duration::from_secs(2);
        let first = cam.next_frame(None, t).unwrap();
        // Late by about one frame each time: nothing is skipped.
        let mut last = first.index;
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(12));
            let f = cam.next_frame(Some(last), t).unwrap();
            assert_eq!(f.index, last + 1);
            last = f.index;
        }
        // Far behind: the oldest kept frame, the gap says how many were lost.
        std::thread::sleep(Duration::from_millis(100));
        let f = cam.next_frame(Some(last), t).unwrap();
        assert!(f.index > last + 1, "{} after {last}", f.index);
        let newest = cam.wait_newer(None, t).unwrap().index;
        assert!(
            newest - f.index < RECENT as u64 + 1,
            "{} vs {newest}",
            f.index
        );
    }

    #[test]
    fn a_camera_that_vanishes_is_named_in_the_error() {
        let cam = Camera::start("wrist", Box::new(pattern(32, 32, 100.0, Some(3)))).unwrap();
        let mut last = None;
        let err = loop {
            match cam.wait_newer(last, Duration::from_secs(2)) {
                Ok(f) => last = Some(f.index),
                Err(e) => break e,
            }
        };
        assert_eq!(last, Some(2));
        assert!(matches!(&err, CameraError::Lost { camera, .. } if camera == "wrist"));
        assert!(err.to_string().contains("camera wrist"), "{err}");
        assert!(matches!(
            cam.read_latest(Duration::from_secs(10)),
            Err(CameraError::Lost { .. })
        ));
    }

    #[test]
    fn no_new_frame_in_time_is_a_timeout_and_an_old_one_is_stale() {
        let cam = Camera::start("slow", Box::new(pattern(32, 32, 2.0, None))).unwrap();
        let f = cam.wait_newer(None, Duration::from_secs(2)).unwrap();
        let e = cam
            .wait_newer(Some(f.index), Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(e, CameraError::Timeout { .. }), "{e}");
        std::thread::sleep(Duration::from_millis(60));
        let e = cam.read_latest(Duration::from_millis(10)).unwrap_err();
        assert!(matches!(e, CameraError::Stale { .. }), "{e}");
    }
}
