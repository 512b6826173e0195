//! Video frames through the `ffmpeg` CLI: decode to raw `rgb24` on a pipe, encode from one
//! ([`encode_frames`] for a whole episode, [`StreamEncoder`] frame by frame while recording).
//!
//! Why a subprocess and not library bindings: the CLI is on every robot host already, keeps this
//! crate free of a C build (cross-compiling stays trivial), and its yuv420p→RGB conversion is the
//! same swscale path (BT.601 limited range for LeRobot's untagged streams) that PyAV and torchcodec
//! use, so decoded pixel means match LeRobot's exactly on the fixtures.
//!
//! Frame selection: LeRobot takes the frame whose pts is nearest to the query time. Seeking with an
//! input `-ss` to half a frame before the query makes ffmpeg (accurate seek: it starts at the
//! previous keyframe and drops earlier frames) emit exactly that nearest frame first. Reading `n`
//! frames from there gives a whole episode in one process (the sequential path).
//!
//! Process start-up (~80 ms for AV1) dominates a one-frame decode, so the reader does not decode
//! per frame: [`FrameStream`] keeps one `ffmpeg` per (camera, episode) open and reads frames from
//! it block by block, and decoded blocks are cached (see `reader`). With the `libav` feature the
//! reader decodes in process instead (`crate::libav`, same frames and pixels as this path);
//! probing and encoding stay here either way.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use image::RgbImage;

use crate::error::{DatasetError, Result};

/// `ffmpeg` decoding `count` frames from the one nearest to `time_s` to raw `rgb24` on stdout.
/// An input `-ss` half a frame early makes ffmpeg's accurate seek emit the nearest frame first.
fn rawvideo_decoder(path: &Path, time_s: f64, fps: f64, count: usize) -> Command {
    let start = (time_s - 0.5 / fps).max(0.0);
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-hide_banner", "-v", "error", "-ss"])
        .arg(format!("{start:.6}"))
        .arg("-i")
        .arg(path)
        .args(["-map", "0:v:0", "-frames:v"])
        .arg(count.to_string())
        .args([
            "-fps_mode",
            "passthrough",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "pipe:1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Which frames one decoder run returns: `count` consecutive frames from the one nearest to
/// `time_s` (seconds from the start of the file), each `width`×`height` (the stream's size, from
/// info.json); `episode` is named in errors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameRun {
    pub time_s: f64,
    pub fps: f64,
    pub count: usize,
    pub width: usize,
    pub height: usize,
    pub episode: usize,
}

/// Decodes the frames of `run` from `path` (one `ffmpeg` process).
pub fn decode_frames(path: &Path, run: &FrameRun) -> Result<Vec<RgbImage>> {
    let &FrameRun {
        time_s,
        fps,
        count,
        width,
        height,
        episode,
    } = run;
    let fail = |message: String| DatasetError::Video {
        path: path.to_path_buf(),
        episode,
        timestamp: time_s,
        message,
    };
    if !path.exists() {
        return Err(fail("video file is missing".into()));
    }
    let mut child = rawvideo_decoder(path, time_s, fps, count)
        .spawn()
        .map_err(|source| DatasetError::Tool {
            program: "ffmpeg",
            source,
        })?;
    let frame_bytes = width * height * 3;
    let mut buf = Vec::with_capacity(frame_bytes * count);
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail("no stdout pipe".into()))?;
    let read = stdout.read_to_end(&mut buf);
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    read.map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "ffmpeg exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if buf.len() != frame_bytes * count {
        return Err(fail(format!(
            "expected {count} frame(s) of {width}x{height}, got {} bytes ({} frame(s)); the video is shorter than the metadata says or its size differs",
            buf.len(),
            buf.len() as f64 / frame_bytes.max(1) as f64
        )));
    }
    Ok(buf
        .chunks_exact(frame_bytes)
        .map(|c| {
            RgbImage::from_raw(width as u32, height as u32, c.to_vec())
                .expect("chunk has exactly one frame")
        })
        .collect())
}

/// A long-lived decoder: one `ffmpeg` run from the frame nearest to `time_s` over `count`
/// consecutive frames, read on demand. The reader keeps one per (camera, episode) so that
/// sequential access costs one process per episode, not one per block.
#[derive(Debug)]
pub struct FrameStream {
    child: std::process::Child,
    stdout: std::process::ChildStdout,
    path: std::path::PathBuf,
    time_s: f64,
    episode: usize,
    width: usize,
    height: usize,
    remaining: usize,
}

impl FrameStream {
    /// Starts decoding (same frame selection as [`decode_frames`]).
    pub fn open(
        path: &Path,
        time_s: f64,
        fps: f64,
        count: usize,
        width: usize,
        height: usize,
        episode: usize,
    ) -> Result<Self> {
        if !path.exists() {
            return Err(DatasetError::Video {
                path: path.to_path_buf(),
                episode,
                timestamp: time_s,
                message: "video file is missing".into(),
            });
        }
        let mut child = rawvideo_decoder(path, time_s, fps, count)
            .spawn()
            .map_err(|source| DatasetError::Tool {
                program: "ffmpeg",
                source,
            })?;
        let stdout = child.stdout.take().ok_or_else(|| DatasetError::Video {
            path: path.to_path_buf(),
            episode,
            timestamp: time_s,
            message: "no stdout pipe".into(),
        })?;
        Ok(FrameStream {
            child,
            stdout,
            path: path.to_path_buf(),
            time_s,
            episode,
            width,
            height,
            remaining: count,
        })
    }

    /// Frames not read yet.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// Reads the next `n` frames (at most [`Self::remaining`]).
    pub fn read(&mut self, n: usize) -> Result<Vec<RgbImage>> {
        let n = n.min(self.remaining);
        let frame_bytes = self.width * self.height * 3;
        let mut out = Vec::with_capacity(n);
        for k in 0..n {
            let mut buf = vec![0u8; frame_bytes];
            if let Err(e) = self.stdout.read_exact(&mut buf) {
                let _ = self.child.kill();
                let mut err = String::new();
                if let Some(mut s) = self.child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                let _ = self.child.wait();
                self.remaining = 0;
                return Err(DatasetError::Video {
                    path: self.path.clone(),
                    episode: self.episode,
                    timestamp: self.time_s,
                    message: format!(
                        "decoder stopped after {k} of {n} requested frame(s) of {}x{} ({e}); the video is shorter than the metadata says or its size differs{}",
                        self.width,
                        self.height,
                        if err.trim().is_empty() { String::new() } else { format!(": {}", err.trim()) }
                    ),
                });
            }
            out.push(
                RgbImage::from_raw(self.width as u32, self.height as u32, buf)
                    .expect("buffer has exactly one frame"),
            );
        }
        self.remaining -= n;
        Ok(out)
    }
}

impl Drop for FrameStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `ffprobe` says about the first video stream of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub codec: String,
    pub width: usize,
    pub height: usize,
    pub pix_fmt: String,
    /// Frames in the stream (`nb_frames`, or counted when the container lacks it).
    pub frames: Option<usize>,
    /// Stream duration in seconds.
    pub duration_s: Option<f64>,
    /// `r_frame_rate` as a number.
    pub fps: Option<f64>,
}

/// `ffprobe` on the first video stream of `path` with `args`; its stdout.
fn ffprobe(path: &Path, args: &[&str]) -> Result<String> {
    let out = saving_tool("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(args)
        .arg(path)
        .output()
        .map_err(|source| DatasetError::Tool {
            program: "ffprobe",
            source,
        })?;
    if !out.status.success() {
        return Err(DatasetError::Video {
            path: path.to_path_buf(),
            episode: 0,
            timestamp: 0.0,
            message: format!(
                "ffprobe failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ffprobe` on a video file.
pub fn probe(path: &Path) -> Result<Probe> {
    let stdout = ffprobe(
        path,
        &[
            "-show_entries",
            "stream=codec_name,width,height,pix_fmt,nb_frames,duration,r_frame_rate",
            "-of",
            "json",
        ],
    )?;
    let fail = |m: String| DatasetError::Video {
        path: path.to_path_buf(),
        episode: 0,
        timestamp: 0.0,
        message: m,
    };
    let v: serde_json::Value = serde_json::from_str(&stdout).map_err(|e| fail(e.to_string()))?;
    let s = &v["streams"][0];
    if s.is_null() {
        return Err(fail("no video stream".into()));
    }
    let num = |k: &str| {
        s[k].as_str()
            .and_then(|x| x.parse::<f64>().ok())
            .or_else(|| s[k].as_f64())
    };
    let fps = s["r_frame_rate"].as_str().and_then(|r| {
        let (a, b) = r.split_once('/')?;
        Some(a.parse::<f64>().ok()? / b.parse::<f64>().ok()?)
    });
    Ok(Probe {
        codec: s["codec_name"].as_str().unwrap_or_default().to_string(),
        width: s["width"].as_u64().unwrap_or(0) as usize,
        height: s["height"].as_u64().unwrap_or(0) as usize,
        pix_fmt: s["pix_fmt"].as_str().unwrap_or_default().to_string(),
        frames: num("nb_frames").map(|x| x as usize),
        duration_s: num("duration"),
        fps,
    })
}

/// Mean of each RGB channel on a 0–255 scale.
pub fn mean_rgb(img: &RgbImage) -> [f64; 3] {
    let mut sum = [0u64; 3];
    for p in img.pixels() {
        for (s, &v) in sum.iter_mut().zip(&p.0) {
            *s += u64::from(v);
        }
    }
    let n = (img.width() as u64 * img.height() as u64).max(1) as f64;
    [sum[0] as f64 / n, sum[1] as f64 / n, sum[2] as f64 / n]
}

/// Encoder settings (LeRobot's `VideoEncoderConfig` defaults: AV1 via libsvtav1, yuv420p, g=2,
/// crf=30, preset 12, fast-decode 0).
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// ffmpeg encoder name: `libsvtav1` (default), `libx264`, `libx265`, `libaom-av1`, `h264_nvenc`, …
    pub vcodec: String,
    pub pix_fmt: String,
    pub g: u32,
    pub crf: u32,
    /// libsvtav1 preset (ignored by other codecs).
    pub preset: Option<u32>,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            vcodec: "libsvtav1".into(),
            pix_fmt: "yuv420p".into(),
            g: 2,
            crf: 30,
            preset: Some(12),
        }
    }
}

/// `ffmpeg`/`ffprobe` for saving, in a process group of its own: a Ctrl-C at the terminal
/// (SIGINT to the foreground group) must not kill an encode, a concat or the probe that checks
/// it half way; the caller decides when to stop, and an episode being saved is finished first.
fn saving_tool(program: &str) -> Command {
    let mut cmd = Command::new(program);
    // SVT-AV1 logs its banner at info level whatever ffmpeg's -v: errors only, so an error
    // message carries the error.
    cmd.env("SVT_LOG", "1");
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd
}

fn run_ffmpeg(args: &[String], path: &Path) -> Result<()> {
    let fail = |message: String| DatasetError::Video {
        path: path.to_path_buf(),
        episode: 0,
        timestamp: 0.0,
        message,
    };
    let out = saving_tool("ffmpeg")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| DatasetError::Tool {
            program: "ffmpeg",
            source,
        })?;
    if !out.status.success() {
        return Err(fail(format!(
            "ffmpeg exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// `ffmpeg` arguments: raw rgb24 `w`×`h` frames at `fps` on stdin → an mp4 at `out` with the
/// encoder settings (constant frame rate; pts of frame i = i/fps).
fn encoder_args(w: u32, h: u32, fps: u32, cfg: &EncoderConfig, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "-nostdin",
        "-hide_banner",
        "-v",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "-s".into(),
        format!("{w}x{h}"),
        "-r".into(),
        fps.to_string(),
        "-i".into(),
        "pipe:0".into(),
    ]);
    args.extend([
        "-c:v".into(),
        cfg.vcodec.clone(),
        "-pix_fmt".into(),
        cfg.pix_fmt.clone(),
        "-g".into(),
        cfg.g.to_string(),
        "-crf".into(),
        cfg.crf.to_string(),
    ]);
    if cfg.vcodec == "libsvtav1" {
        if let Some(p) = cfg.preset {
            args.extend(["-preset".into(), p.to_string()]);
        }
        args.extend(["-svtav1-params".into(), "fast-decode=0".into()]);
    }
    // Tag limited range like LeRobot's streams so decoders pick BT.601 limited.
    args.extend([
        "-color_range".into(),
        "tv".into(),
        "-movflags".into(),
        "+faststart".into(),
        "-f".into(),
        "mp4".into(),
    ]);
    args.push(out.to_string_lossy().into_owned());
    args
}

/// Encodes RGB frames into an mp4 at `fps` (constant frame rate; pts of frame i = i/fps).
pub fn encode_frames(frames: &[RgbImage], fps: u32, cfg: &EncoderConfig, out: &Path) -> Result<()> {
    let first = frames
        .first()
        .ok_or_else(|| DatasetError::Usage("no frames to encode".into()))?;
    let (w, h) = first.dimensions();
    let mut enc = StreamEncoder::start(out, w, h, fps, cfg)?;
    for f in frames {
        if f.dimensions() != (w, h) {
            return Err(DatasetError::Usage(format!(
                "frame size {:?} differs from the first frame's {:?}",
                f.dimensions(),
                (w, h)
            )));
        }
        enc.push(f.as_raw().clone())?;
    }
    enc.finish()
}

/// An mp4 encoded while its frames arrive (recording): one `ffmpeg` reading raw rgb24 on a
/// pipe, fed by a thread from an unbounded queue so a slow encoder never blocks the caller
/// (at worst the queue holds what a buffered episode would). Dropped unfinished, it kills
/// the encoder and removes the partial file.
#[derive(Debug)]
pub struct StreamEncoder {
    out: std::path::PathBuf,
    width: u32,
    height: u32,
    frames: usize,
    tx: Option<std::sync::mpsc::Sender<Vec<u8>>>,
    feeder: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    child: Option<std::process::Child>,
}

impl StreamEncoder {
    pub fn start(
        out: &Path,
        width: u32,
        height: u32,
        fps: u32,
        cfg: &EncoderConfig,
    ) -> Result<Self> {
        use std::io::Write;
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).map_err(crate::error::io_err(dir))?;
        }
        let mut child = saving_tool("ffmpeg")
            .args(encoder_args(width, height, fps, cfg, out))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| DatasetError::Tool {
                program: "ffmpeg",
                source,
            })?;
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let mut stdin = child.stdin.take();
        let feeder = std::thread::spawn(move || {
            if let Some(stdin) = stdin.as_mut() {
                for frame in rx {
                    stdin.write_all(&frame)?;
                }
            }
            Ok(())
        });
        // Drained as it comes so a chatty encoder can never fill the pipe and stall.
        let mut err = child.stderr.take();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_string(&mut text);
            }
            text
        });
        Ok(Self {
            out: out.to_path_buf(),
            width,
            height,
            frames: 0,
            tx: Some(tx),
            feeder: Some(feeder),
            stderr: Some(stderr),
            child: Some(child),
        })
    }

    fn fail(&self, message: String) -> DatasetError {
        DatasetError::Encode {
            path: self.out.clone(),
            message: format!("after {} frame(s): {message}", self.frames),
        }
    }

    /// Queues one frame (`width × height × 3` RGB bytes).
    pub fn push(&mut self, rgb: Vec<u8>) -> Result<()> {
        if rgb.len() != (self.width * self.height * 3) as usize {
            return Err(DatasetError::Usage(format!(
                "frame of {} bytes for a {}x{} encoder",
                rgb.len(),
                self.width,
                self.height
            )));
        }
        let sent = self.tx.as_ref().map(|tx| tx.send(rgb).is_ok());
        if sent != Some(true) {
            return Err(self.fail("the encoder stopped taking frames".into()));
        }
        self.frames += 1;
        Ok(())
    }

    /// Frames queued so far.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Ends the stream and waits for the file.
    pub fn finish(mut self) -> Result<()> {
        drop(self.tx.take());
        let fed = self.feeder.take().map(|f| f.join());
        let Some(mut child) = self.child.take() else {
            return Err(self.fail("encoder already gone".into()));
        };
        let status = child.wait().map_err(|e| self.fail(e.to_string()))?;
        let stderr = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if !status.success() {
            return Err(self.fail(format!("ffmpeg exited with {status}: {}", stderr.trim())));
        }
        match fed {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(self.fail(format!("writing frames to ffmpeg: {e}"))),
            _ => Err(self.fail("the frame feeder thread died".into())),
        }
    }
}

impl Drop for StreamEncoder {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(self.tx.take());
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&self.out);
        }
    }
}

/// One input of [`concat_files`]: a file and, for every input but the last, how long it lasts.
#[derive(Debug, Clone, Copy)]
pub struct ConcatPart<'a> {
    pub path: &'a Path,
    /// The time at which the next part starts, relative to this part's start: its frame count
    /// over the fps. `None` lets ffmpeg take the container's duration, which mp4 rounds to
    /// milliseconds (the movie header's timescale): 40 frames at 30 fps "last" 1.334 s, and
    /// every later frame would sit 0.67 ms late — past LeRobot's 0.1 ms tolerance.
    pub duration_s: Option<f64>,
}

/// Concatenates mp4s without re-encoding (`concatenate_video_files`: concat demuxer, stream
/// copy). Each part's `duration_s` is written into the list as a `duration` directive, so the
/// next part's frames start exactly there instead of at the rounded container duration.
pub fn concat_files(parts: &[ConcatPart<'_>], out: &Path) -> Result<()> {
    let list_path = out.with_extension("concat.txt");
    let list: String = parts
        .iter()
        .map(|part| {
            // ffmpeg resolves relative entries against the list file's own directory, so
            // a relative dataset root would be doubled: always list absolute paths.
            let abs = std::path::absolute(part.path).unwrap_or_else(|_| part.path.to_path_buf());
            let mut entry = format!(
                "file '{}'\n",
                abs.display().to_string().replace('\'', "'\\''")
            );
            if let Some(d) = part.duration_s {
                // Microseconds: the concat demuxer's own time base.
                entry += &format!("duration {d:.6}\n");
            }
            entry
        })
        .collect();
    std::fs::write(&list_path, list).map_err(crate::error::io_err(&list_path))?;
    let args: Vec<String> = [
        "-nostdin",
        "-hide_banner",
        "-v",
        "error",
        "-y",
        "-f",
        "concat",
        "-safe",
        "0",
        "-i",
    ]
    .map(String::from)
    .into_iter()
    .chain([
        list_path.to_string_lossy().into_owned(),
        "-c".into(),
        "copy".into(),
        "-movflags".into(),
        "+faststart".into(),
        "-f".into(),
        "mp4".into(),
        out.to_string_lossy().into_owned(),
    ])
    .collect();
    let r = run_ffmpeg(&args, out);
    let _ = std::fs::remove_file(&list_path);
    r
}

/// Presentation times (seconds, ascending) of the first video stream's frames, as every
/// decoder sees them (edit lists applied): the packets' pts, read without decoding. With
/// `from_s`, reading starts at the keyframe before that time (the rest of the file is skipped).
pub fn frame_times(path: &Path, from_s: Option<f64>) -> Result<Vec<f64>> {
    let interval = from_s.filter(|t| *t > 0.0).map(|t| format!("{t:.6}%"));
    let mut args = vec![
        // Integer pts and the stream's time base: exact times (pts_time prints 6 decimals).
        "-show_entries",
        "stream=time_base:packet=pts",
        "-of",
        "compact",
    ];
    if let Some(i) = &interval {
        args.extend(["-read_intervals", i]);
    }
    let text = ffprobe(path, &args)?;
    let fail = |message: String| DatasetError::Video {
        path: path.to_path_buf(),
        episode: 0,
        timestamp: from_s.unwrap_or(0.0),
        message,
    };
    let time_base = text
        .lines()
        .find_map(|l| l.strip_prefix("stream|time_base="))
        .and_then(|r| {
            let (a, b) = r.trim().split_once('/')?;
            let (a, b) = (a.parse::<f64>().ok()?, b.parse::<f64>().ok()?);
            (b > 0.0).then_some(a / b)
        })
        .ok_or_else(|| fail("no video stream time base".into()))?;
    let mut times: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("packet|pts="))
        .filter_map(|v| v.trim().parse::<i64>().ok())
        .map(|pts| pts as f64 * time_base)
        .collect();
    if times.is_empty() {
        return Err(fail("no video frames with a presentation time".into()));
    }
    // Packets come in decode order; B-frames make that differ from presentation order.
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// The index of the time in `sorted` nearest to `t` (LeRobot's pick: the frame whose
/// presentation time is closest to the query), with its distance.
pub fn nearest(sorted: &[f64], t: f64) -> Option<(usize, f64)> {
    let i = sorted.partition_point(|&x| x < t);
    [i.checked_sub(1), (i < sorted.len()).then_some(i)]
        .into_iter()
        .flatten()
        .map(|j| (j, (sorted[j] - t).abs()))
        .min_by(|a, b| a.1.total_cmp(&b.1))
}
