"""KSM itself: ksmd's scanner, the stable and unstable trees, merging, sysfs, advisor."""
