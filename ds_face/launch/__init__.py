"""Launching: the checks before any rank starts, the hostfile, the multi-node runner."""
