"""Benchmarks behind `collab-agent bench NAME`; each module registers one command."""
