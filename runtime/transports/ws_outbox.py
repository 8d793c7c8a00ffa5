"""The frames a WebSocket is waiting to send, bounded: a slow reader holds back the sender
(chat: the generation slows down) or loses the oldest frames (feeds), never grows memory."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from runtime.transports.ws_frames import Frame


@dataclass
class Close:
    """Close the socket with `code` (1000, 1008, 1011) once the frames before it are sent."""

    code: int
    reason: str = ""


class Outbox:
    """Frames waiting for the client: at most `size` data frames. When full, `put` waits
    (backpressure) or, with `drop_oldest`, drops the oldest and later says how many. Control
    frames (pong, ping, errors about client frames) jump the queue and are themselves bounded."""

    def __init__(self, size: int, *, drop_oldest: bool) -> None:
        self.size = max(1, size)
        self.drop_oldest = drop_oldest
        self.dropped = 0
        self._frames: deque[Frame] = deque()
        self._control: deque[Frame] = deque(maxlen=self.size)
        self._close: Close | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    async def put(self, frame: Frame) -> None:
        while len(self._frames) >= self.size and not self.drop_oldest:
            self._writable.clear()
            await self._writable.wait()
        if len(self._frames) >= self.size:
            self._frames.popleft()
            self.dropped += 1
        self._frames.append(frame)
        self._readable.set()

    def put_control(self, frame: Frame) -> None:
        self._control.append(frame)
        self._readable.set()

    def close(self, code: int, reason: str = "") -> None:
        """Close the socket once the frames queued so far are sent."""
        self._close = self._close or Close(code, reason)
        self._readable.set()

    async def get(self) -> Frame | Close:
        while True:
            if self._control:
                return self._control.popleft()
            if self.dropped:
                count, self.dropped = self.dropped, 0
                return {"type": "dropped", "count": count}
            if self._frames:
                self._writable.set()
                return self._frames.popleft()
            if self._close is not None:
                return self._close
            self._readable.clear()
            await self._readable.wait()
