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
