"""The plan before any work: per stage, memory (accelerator and host), disk and time, and the machine it is made for."""
