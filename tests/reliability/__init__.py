"""Crash torture of pymq: servers, clients and embedded brokers killed at random."""
