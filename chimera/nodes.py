"""Ready-made nodes: sources of video, audio and sensor data, and a processing node.

They need no hardware: without a device, :class:`Camera` draws a moving test
pattern with a frame counter, :class:`Microphone` plays a tone with a click
every second, :class:`Sensor` walks at random. ``chimera demo`` records a
session with them.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy

from ._data import DataChunk
from ._node import Node

__all__ = ["Camera", "Microphone", "MotionEnergy", "Sensor"]


class _Paced(Node):
    """A source that steps *rate* times a second (it sleeps in ``step``)."""

    def __init__(self, name: str, rate: float) -> None:
        super().__init__(name)
        if not rate > 0:
            raise ValueError(f"{name}: the rate is positive, not {rate!r}")
        self.rate = rate

    def prep(self) -> None:
        self._next: float | None = None  # the first step goes at once

    def _wait_for_turn(self) -> None:
        if self._next is None:
            self._next = time.monotonic()
            return
        self._next += 1 / self.rate
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -1 / self.rate:  # a turn missed: go on from now, not in a burst
            self._next = time.monotonic()


class Camera(_Paced):
    """Video frames: from the camera *index* (OpenCV), or a test pattern.

    Each step saves the frame to the video ``video`` and sends it as the
    ``image`` record ``frame``.

    Args:
        index: the camera to open (``cv2.VideoCapture(index)``); None draws
            a moving test pattern with a frame counter.
        width, height: the test pattern's size (a camera gives its own).
        fps: frames per second.

    Raises:
        OSError: (in ``prep``) the camera cannot be opened or read.
    """

    def __init__(
        self,
        name: str = "camera",
        index: int | None = None,
        width: int = 640,
        height: int = 480,
        fps: int = 30,
    ) -> None:
        super().__init__(name, fps)
        self.index, self.width, self.height, self.fps = index, width, height, fps

    def prep(self) -> None:
        import cv2

        self._frames = 0
        self._capture = None
        if self.index is not None:
            self._capture = cv2.VideoCapture(self.index)
            if not self._capture.isOpened():
                raise OSError(f"cannot open camera {self.index}")
        else:
            y, x = numpy.mgrid[0 : self.height, 0 : self.width]
            self._pattern = numpy.stack(
                [(x * 255 // self.width), (y * 255 // self.height), ((x + y) // 4 % 256)], axis=-1
            ).astype(numpy.uint8)
        super().prep()

    def step(self) -> DataChunk:
        self._wait_for_turn()
        frame = self._read() if self._capture is not None else self._draw()
        self._frames += 1
        self.save_video("video", frame, fps=self.fps)
        chunk = DataChunk()
        chunk.add("frame", frame, "image")
        return chunk

    def teardown(self) -> None:
        if self._capture is not None:
            self._capture.release()

    def _read(self) -> numpy.ndarray:
        assert self._capture is not None  # (step reads only from a camera)
        ok, frame = self._capture.read()
        if not ok:
            raise OSError(f"camera {self.index} gave no frame")
        return frame

    def _draw(self) -> numpy.ndarray:
        import cv2

        frame = numpy.roll(self._pattern, self._frames * 4, axis=1)
        bar = (self._frames * 8) % self.height
        frame[bar : bar + 16] = 255
        cv2.putText(
            frame, f"frame {self._frames}", (20, 50), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (0, 0, 0), 3
        )
        return frame


class Microphone(_Paced):
    """Audio blocks: from an input device (sounddevice), or a tone with clicks.

    Each step saves a block of *block* samples to the audio ``audio`` (int16).

    Args:
        device: the sounddevice input device (an index or a name), or None for
            a 440 Hz tone with a click every second; ``"default"`` for the
            system's default input.
        rate: samples per second.
        channels: channels.
        block: samples per step.

    Raises:
        ImportError: (in ``prep``) a device is asked for and sounddevice is
            not installed (``pip install sounddevice``).
    """

    def __init__(
        self,
        name: str = "microphone",
        device: int | str | None = None,
        rate: int = 48000,
        channels: int = 1,
        block: int = 1024,
    ) -> None:
        super().__init__(name, rate / block)
        self.device, self.sample_rate, self.channels, self.block = device, rate, channels, block

    def prep(self) -> None:
        self._stream: Any = None
        self._samples = 0
        if self.device is not None:
            try:
                import sounddevice
            except ImportError:
                raise ImportError(
                    "a microphone device needs sounddevice: pip install sounddevice"
                ) from None
            device = None if self.device == "default" else self.device
            self._stream = sounddevice.InputStream(
                device=device, channels=self.channels, samplerate=self.sample_rate, dtype="int16"
            )
            self._stream.start()
        super().prep()

    def step(self) -> None:
        if self._stream is not None:
            block, _ = self._stream.read(self.block)  # waits for the device
        else:
            self._wait_for_turn()
            block = self._tone()
        self._samples += len(block)
        self.save_audio("audio", block, channels=self.channels, format=8, rate=self.sample_rate)

    def teardown(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()

    def _tone(self) -> numpy.ndarray:
        t = (self._samples + numpy.arange(self.block)) / self.sample_rate
        wave = 0.3 * numpy.sin(2 * math.pi * 440 * t)
        wave[(t % 1.0) < 0.005] = 0.9  # a click at each second
        samples = (wave * 32767).astype(numpy.int16)
        return numpy.repeat(samples[:, None], self.channels, axis=1)


class Sensor(_Paced):
    """A three-axis sensor walking at random, *rate* rows a second, saved to
    the table ``sensor`` (columns x, y, z) and sent as the record ``xyz``."""

    def __init__(self, name: str = "sensor", rate: float = 100, seed: int | None = None) -> None:
        super().__init__(name, rate)
        self.seed = seed

    def prep(self) -> None:
        self._random = numpy.random.default_rng(self.seed)
        self._position = numpy.zeros(3)
        super().prep()

    def step(self) -> DataChunk:
        self._wait_for_turn()
        self._position += self._random.normal(0, 0.1, 3)
        x, y, z = (float(v) for v in self._position)
        self.save_tabular("sensor", {"x": x, "y": y, "z": z})
        chunk = DataChunk()
        chunk.add("xyz", self._position.copy(), "array")
        return chunk


class MotionEnergy(Node):
    """How much the picture moves: the mean absolute difference between a
    camera's consecutive gray frames, saved to the table ``motion``
    (column ``energy``, 0-255) and sent as the record ``energy``.

    Args:
        source: the name of the camera node (its ``frame`` record).
    """

    def __init__(self, name: str = "motion", source: str = "camera") -> None:
        super().__init__(name)
        self.source = source

    def prep(self) -> None:
        self._last: numpy.ndarray | None = None

    def step(self, data_chunks: dict[str, DataChunk]) -> DataChunk | None:
        import cv2

        frame = data_chunks[self.source].get("frame")["value"]
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
        last, self._last = self._last, gray
        if last is None or last.shape != gray.shape:
            return None
        energy = float(cv2.absdiff(gray, last).mean())
        self.save_tabular("motion", {"energy": energy})
        chunk = DataChunk()
        chunk.add("energy", energy)
        return chunk
