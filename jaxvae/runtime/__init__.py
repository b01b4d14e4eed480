"""How the maths runs on this machine: the execution policy, device meshes, the batcher."""
