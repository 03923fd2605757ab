"""The scheduler's queues, kept in priority order: lower `priority` values are served first.

Within one priority class requests keep the order they reached the scheduler (first come, first
served), so with every request at the default priority 0 both queues behave as plain FIFOs.
"""

from __future__ import annotations

from collections import deque

from llmserve.engine.request import Request


class RequestQueue(deque):
    """Waiting requests ordered by (priority, arrival); the head is admitted next.

    Insertion scans from the end that is nearest for uniform traffic, so a queue whose requests
    share one priority adds in O(1); a request of a rarer class costs one pass over the queue.
    """

    def add(self, request: Request) -> None:
        """Queue a new arrival behind every request of its priority class (and more urgent)."""
        self.insert(insertion_index(self, request.priority), request)

    def add_front(self, request: Request) -> None:
        """Re-queue a preempted request at the front of its priority class."""
        i = 0
        while i < len(self) and self[i].priority < request.priority:
            i += 1
        self.insert(i, request)


def insertion_index(requests: deque[Request] | list[Request], priority: int) -> int:
    """Index after the last request whose priority is `priority` or more urgent."""
    i = len(requests)
    while i > 0 and requests[i - 1].priority > priority:
        i -= 1
    return i
