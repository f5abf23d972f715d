"""Helpers of the test suite (not tests): the local Hub look-alike, fuzzers, fault injectors, probes."""
