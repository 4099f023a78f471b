"""Local replicas of the real services, for the tests, ``emdata demo`` and users' own offline tests.

Nothing here is used by the product code paths: sources talk to whatever URL params.yaml names,
and these replicas stand up loopback servers that speak the same protocols and wire formats.
"""
