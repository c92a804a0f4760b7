"""The block loop and its runtime: devices, compile policy, data parallel, resume, reports, progress."""
