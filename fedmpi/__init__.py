"""fedmpi: an MPI simulator for communication-compressed, sharpness-aware federated learning."""

__version__ = "0.1.0"
