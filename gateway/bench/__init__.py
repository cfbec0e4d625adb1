"""Fleet-scale benchmarks: onboarding, revocation and a renewal soak against a gateway in its own
process, with simulated devices in worker processes (see docs/benchmarks.md)."""
