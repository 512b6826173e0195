//! In-process video decoding through the FFmpeg libraries (feature `libav`, via `ffmpeg-next`).
//!
//! The `ffmpeg` CLI path ([`crate::video::decode_frames`]) starts a process per decoder run
//! (~80 ms for AV1), which a random read past the frame cache pays for every frame. A
//! [`Decoder`] instead stays open on one file: a request seeks to the keyframe at or before the
//! wanted time (LeRobot encodes with a 2-frame GOP, so little is decoded in vain) and decodes
//! forward; a request for the frame right after the last one continues without seeking.
//!
//! Same frames and pixels as the CLI path, by construction:
//! - selection: the CLI's accurate `-ss` (half a frame before the query, relative to the
//!   container's start time) seeks with `avformat_seek_file(-1, MIN, t, t)` and drops frames
//!   whose best-effort timestamp is before `t`; so does [`Decoder::frames`];
//! - conversion: the CLI's `-pix_fmt rgb24` is an auto-inserted `scale` filter with the CLI's
//!   default `sws_flags` (`bicubic`), which sets the input matrix and range from each frame
//!   (untagged: BT.601; range from the stream's tag). [`Rgb`] calls swscale the same way.
//!
//! The tests compare both paths pixel for pixel on AV1 and H.264 (`tests/libav.rs`).

use std::path::{Path, PathBuf};
use std::sync::Once;

use ff::format::Pixel;
use ff::software::scaling;
use ffmpeg_next as ff;
use image::RgbImage;

use crate::error::{DatasetError, Result};
use crate::video::FrameRun;

/// How far past the last decoded frame a request may start and still be served by decoding
/// forward instead of seeking (seconds; a few frames at LeRobot's frame rates).
const FORWARD_MAX_S: f64 = 0.15;

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Like the CLI's `-v error`: the libraries' warnings are not ours to print.
        ff::util::log::set_level(ff::util::log::Level::Error);
        let _ = ff::init();
    });
}

/// An open video file: demuxer, decoder and RGB converter, positioned after the last frame it
/// returned.
pub struct Decoder {
    path: PathBuf,
    input: ff::format::context::Input,
    stream: usize,
    /// Seconds per pts tick of the video stream.
    time_base: f64,
    /// The container's start time (s): the CLI's `-ss` counts from it.
    start_time_s: f64,
    decoder: ff::decoder::Video,
    rgb: Option<Rgb>,
    frame: ff::frame::Video,
    /// Presentation time (s) of the last frame returned; `None` after opening or an error.
    last_s: Option<f64>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("path", &self.path)
            .field("last_s", &self.last_s)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// Opens the first video stream of `path`; `threads` decoder threads (0: libavcodec picks,
    /// one per core, like the CLI).
    pub fn open(path: &Path, threads: usize) -> Result<Self> {
        init();
        let fail = |m: String| video_err(path, 0, 0.0, m);
        if !path.exists() {
            return Err(fail("video file is missing".into()));
        }
        let input = ff::format::input(path).map_err(|e| fail(format!("cannot open: {e}")))?;
        let (stream, time_base, params) = {
            let s = input
                .streams()
                .best(ff::media::Type::Video)
                .ok_or_else(|| fail("no video stream".into()))?;
            (s.index(), s.time_base(), s.parameters())
        };
        let ctx = ff::codec::context::Context::from_parameters(params)
            .map_err(|e| fail(format!("codec parameters: {e}")))?;
        let codec = ff::decoder::find(ctx.id())
            .ok_or_else(|| fail(format!("no decoder for codec {:?}", ctx.id())))?;
        let mut ctx = ctx.decoder();
        // As the CLI does: decoders use it for timestamps they derive.
        ctx.set_packet_time_base(time_base);
        let mut opts = ff::Dictionary::new();
        let threads = if threads == 0 {
            "auto".to_string()
        } else {
            threads.to_string()
        };
        opts.set("threads", &threads);
        let decoder = ctx
            .open_as_with(codec, opts)
            .and_then(|o| o.video())
            .map_err(|e| fail(format!("cannot open the {} decoder: {e}", codec.name())))?;
        let start_time_s = ffi::start_time_us(&input).map_or(0.0, |us| us as f64 / 1e6);
        Ok(Decoder {
            path: path.to_path_buf(),
            input,
            stream,
            time_base: f64::from(time_base),
            start_time_s,
            decoder,
            rgb: None,
            frame: ff::frame::Video::empty(),
            last_s: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The frames of `run` (same selection as the CLI path).
    pub fn frames(&mut self, run: &FrameRun) -> Result<Vec<RgbImage>> {
        let start = self.start_time_s + (run.time_s - 0.5 / run.fps).max(0.0);
        let r = self.frames_from(start, run.count, run.width, run.height);
        if r.is_err() {
            self.last_s = None;
        }
        r.map_err(|m| video_err(&self.path, run.episode, run.time_s, m))
    }

    fn frames_from(
        &mut self,
        start: f64,
        count: usize,
        width: usize,
        height: usize,
    ) -> std::result::Result<Vec<RgbImage>, String> {
        let forward = self
            .last_s
            .is_some_and(|last| last < start && start - last <= FORWARD_MAX_S);
        if !forward {
            self.seek(start)?;
        }
        // After a seek the first frame must not start past `start`: if it does, the demuxer's
        // keyframe lay after a frame we want (B-frames, odd indexes); seek again well before.
        let mut check_first = !forward && start > self.start_time_s;
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let Some(pts) = self.next_frame()? else {
                return Err(format!(
                    "decoder stopped after {} of {count} requested frame(s) of {width}x{height}; the video is shorter than the metadata says or is truncated",
                    out.len()
                ));
            };
            if std::mem::take(&mut check_first) && pts > start {
                self.seek((start - 2.0).max(self.start_time_s))?;
                continue;
            }
            if pts < start {
                continue;
            }
            let (w, h) = (self.frame.width() as usize, self.frame.height() as usize);
            if (w, h) != (width, height) {
                return Err(format!(
                    "frame is {w}x{h}, the metadata says {width}x{height}"
                ));
            }
            out.push(self.rgb_frame()?);
            self.last_s = Some(pts);
        }
        Ok(out)
    }

    /// Seeks to the keyframe at or before `t` (seconds) and resets the decoder.
    fn seek(&mut self, t: f64) -> std::result::Result<(), String> {
        let ts = (t * 1e6).round() as i64;
        self.input
            .seek(ts, ..ts)
            .map_err(|e| format!("seek to {t:.6}s failed: {e}"))?;
        self.decoder.flush();
        self.last_s = None;
        Ok(())
    }

    /// Decodes the next frame into `self.frame`; its presentation time (s), `None` at the end.
    fn next_frame(&mut self) -> std::result::Result<Option<f64>, String> {
        loop {
            match self.decoder.receive_frame(&mut self.frame) {
                Ok(()) => {
                    let pts = self
                        .frame
                        .timestamp()
                        .or(self.frame.pts())
                        .ok_or("decoded frame has no timestamp")?;
                    return Ok(Some(pts as f64 * self.time_base));
                }
                Err(ff::Error::Eof) => return Ok(None),
                Err(ff::Error::Other { errno }) if errno == ff::error::EAGAIN => {}
                Err(e) => return Err(format!("decoding failed: {e}")),
            }
            // The decoder wants input: the next packet of our stream, or the end.
            loop {
                let mut packet = ff::Packet::empty();
                match packet.read(&mut self.input) {
                    Ok(()) if packet.stream() != self.stream => continue,
                    Ok(()) => {
                        self.decoder
                            .send_packet(&packet)
                            .map_err(|e| format!("corrupt video packet: {e}"))?;
                    }
                    Err(ff::Error::Eof) => {
                        // A second end-of-stream after draining is harmless.
                        let _ = self.decoder.send_eof();
                    }
                    Err(e) => return Err(format!("reading the file failed: {e}")),
                }
                break;
            }
        }
    }

    fn rgb_frame(&mut self) -> std::result::Result<RgbImage, String> {
        let key = RgbKey::of(&self.frame);
        if self.rgb.as_ref().is_none_or(|r| r.key != key) {
            self.rgb = Some(Rgb::new(key)?);
        }
        let rgb = self.rgb.as_mut().ok_or("no RGB converter")?;
        rgb.convert(&self.frame)
    }
}

/// What a converter depends on: the decoded frames' format, size, matrix and range.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RgbKey {
    format: Pixel,
    width: u32,
    height: u32,
    space: ff::color::Space,
    range: ff::color::Range,
}

impl RgbKey {
    fn of(f: &ff::frame::Video) -> Self {
        RgbKey {
            format: f.format(),
            width: f.width(),
            height: f.height(),
            space: f.color_space(),
            range: f.color_range(),
        }
    }
}

/// swscale to packed RGB, set up like the CLI's auto-inserted `scale` filter.
struct Rgb {
    key: RgbKey,
    sws: scaling::Context,
    out: ff::frame::Video,
}

// SAFETY: the SwsContext is owned by this value alone and only used through `&mut self`;
// swscale keeps no thread-local state, so moving it to another thread is sound (ffmpeg-next
// marks its other owned contexts Send the same way).
#[allow(unsafe_code)]
unsafe impl Send for Rgb {}

impl Rgb {
    fn new(key: RgbKey) -> std::result::Result<Self, String> {
        let mut sws = scaling::Context::get(
            key.format,
            key.width,
            key.height,
            Pixel::RGB24,
            key.width,
            key.height,
            // The CLI's default `sws_flags`.
            scaling::Flags::BICUBIC,
        )
        .map_err(|e| format!("no {:?} to RGB converter: {e}", key.format))?;
        ffi::set_colorspace_like_vf_scale(&mut sws, key.space, key.range);
        Ok(Rgb {
            key,
            sws,
            out: ff::frame::Video::empty(),
        })
    }

    fn convert(&mut self, f: &ff::frame::Video) -> std::result::Result<RgbImage, String> {
        self.sws
            .run(f, &mut self.out)
            .map_err(|e| format!("RGB conversion failed: {e}"))?;
        let (w, h) = (self.key.width as usize, self.key.height as usize);
        let stride = self.out.stride(0);
        let data = self.out.data(0);
        let mut buf = Vec::with_capacity(w * h * 3);
        for row in data.chunks(stride).take(h) {
            buf.extend_from_slice(&row[..w * 3]);
        }
        RgbImage::from_raw(w as u32, h as u32, buf).ok_or_else(|| "short RGB frame".into())
    }
}

fn video_err(path: &Path, episode: usize, timestamp: f64, message: String) -> DatasetError {
    DatasetError::Video {
        path: path.to_path_buf(),
        episode,
        timestamp,
        message,
    }
}

/// The two things `ffmpeg-next` has no safe call for.
#[allow(unsafe_code)]
mod ffi {
    use super::ff;
    use ff::ffi;

    /// `AVFormatContext.start_time` in microseconds, when known.
    pub(super) fn start_time_us(input: &ff::format::context::Input) -> Option<i64> {
        // SAFETY: `input` owns a valid, opened AVFormatContext for its whole lifetime.
        let t = unsafe { (*input.as_ptr()).start_time };
        (t != ffi::AV_NOPTS_VALUE).then_some(t)
    }

    /// vf_scale's `sws_setColorspaceDetails` call (FFmpeg 5.1 `scale_frame`, options at their
    /// defaults: `in_color_matrix=auto`, ranges unset): the input matrix from the frame's
    /// colour space (BT.601 when untagged or unknown), the output matrix the same, the input
    /// range from the frame when tagged, everything else as swscale chose.
    pub(super) fn set_colorspace_like_vf_scale(
        sws: &mut ff::software::scaling::Context,
        space: ff::color::Space,
        range: ff::color::Range,
    ) {
        let mut cs = ffi::AVColorSpace::from(space) as i32;
        if !(1..=10).contains(&cs) || cs == 8 {
            cs = ffi::AVColorSpace::AVCOL_SPC_BT470BG as i32;
        }
        // SAFETY: `sws` is a valid SwsContext; the pointers passed to the getter point to live
        // locals; sws_getCoefficients returns a pointer to a static table.
        unsafe {
            let ctx = sws.as_mut_ptr();
            let (mut inv, mut table) = (std::ptr::null_mut(), std::ptr::null_mut());
            let (mut in_full, mut out_full, mut bri, mut con, mut sat) = (0, 0, 0, 0, 0);
            ffi::sws_getColorspaceDetails(
                ctx,
                &mut inv,
                &mut in_full,
                &mut table,
                &mut out_full,
                &mut bri,
                &mut con,
                &mut sat,
            );
            let coeffs = ffi::sws_getCoefficients(cs);
            match range {
                ff::color::Range::JPEG => in_full = 1,
                ff::color::Range::MPEG => in_full = 0,
                _ => {}
            }
            ffi::sws_setColorspaceDetails(ctx, coeffs, in_full, coeffs, out_full, bri, con, sat);
        }
    }
}
