"""Reward plug-ins used by the verifier tests (imported by name in worker processes)."""

import os
import time


def length_reward(response: str, answer: str) -> float:
    return 1.0 if answer in response else 0.25


def hang(response: str, answer: str) -> float:
    if "hang" in response:
        time.sleep(3600)
    return 1.0 if answer in response else 0.0


def crash(response: str, answer: str) -> float:
    if "crash" in response:
        raise RuntimeError("boom")
    if "exit" in response:
        os._exit(3)
    return 1.0 if answer in response else 0.0


def digits_reward(response: str, answer: str) -> float:
    """Graded reward so that a random tiny model's groups have non-zero advantages."""
    if answer in response:
        return 1.0
    return len(set(response) & set("0123456789")) / 10


def hang_sometimes(response: str, answer: str) -> float:
    """Hangs on every third response length: the step must still complete."""
    if len(response) % 3 == 0:
        time.sleep(3600)
    return digits_reward(response, answer)
