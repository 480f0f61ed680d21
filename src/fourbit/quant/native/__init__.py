"""Native C++ kernels (placeholder until the extension lands): reports unavailable so the pure-torch path runs."""


def available() -> bool:
    return False


def build_error() -> str:
    return "native kernels not built yet"
