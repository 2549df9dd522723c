"""modules/call_queue.py: ``queue_lock``, a FIFOLock that is not reentrant.

The stand-in raises where the real lock would deadlock, so a test fails instead of hanging.
"""

import threading


class FIFOLock:
    def __init__(self):
        self._lock = threading.Lock()
        self.owner = None

    def __enter__(self):
        if self.owner == threading.get_ident():
            raise RuntimeError("queue_lock taken twice by one thread: the webui would deadlock here")
        self._lock.acquire()
        self.owner = threading.get_ident()
        return self

    def __exit__(self, *exc):
        self.owner = None
        self._lock.release()

    def held(self) -> bool:
        return self.owner is not None


queue_lock = FIFOLock()
