"""Reading media for the mllm backend: images (PIL), audio and video frames (PyAV); errors name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class MediaError(ValueError):
    """A media file is missing or cannot be decoded; the message names the file."""


def _check(path: Path) -> None:
    if not path.is_file():
        raise MediaError(f"media file not found: {path}")


def load_image(path: str | Path):
    """RGB ``PIL.Image`` (fully decoded, so truncated files fail here, not later)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _check(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"unreadable image {path}: {exc}") from None


def load_audio(path: str | Path, sampling_rate: int) -> np.ndarray:
    """Mono float32 waveform (T,) resampled to ``sampling_rate`` (PyAV / FFmpeg decoders)."""
    import av

    path = Path(path)
    _check(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"unreadable audio {path}: no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
            chunks = []
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):  # flush
                chunks.append(out.to_ndarray().reshape(-1))
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"unreadable audio {path}: {exc}") from None
    wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if wave.size == 0:
        raise MediaError(f"unreadable audio {path}: no samples decoded")
    if not np.isfinite(wave).all():
        raise MediaError(f"unreadable audio {path}: NaN/inf samples")
    return wave


def sample_video_frames(path: str | Path, num_frames: int) -> list:
    """``num_frames`` RGB ``PIL.Image`` frames spread uniformly over the video."""
    import av

    path = Path(path)
    _check(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"unreadable video {path}: no video stream")
            total = container.streams.video[0].frames  # 0 when the container does not say
            if total > 0:  # keep only the sampled frames in memory
                wanted = set(np.linspace(0, total - 1, num=min(num_frames, total)).round().astype(int).tolist())
                frames = [f.to_image() for i, f in enumerate(container.decode(video=0)) if i in wanted]
            else:
                frames = [f.to_image() for f in container.decode(video=0)]
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"unreadable video {path}: {exc}") from None
    if not frames:
        raise MediaError(f"unreadable video {path}: no frames decoded")
    idx = np.linspace(0, len(frames) - 1, num=min(num_frames, len(frames))).round().astype(int)
    return [frames[i].convert("RGB") for i in sorted(set(idx.tolist()))]
