"""The simulation of federated fine-tuning on one machine: its configuration (`SimConfig`, presets, checks), the
builders of data and model, the round loop (`fedamole.simulation.runner.simulate`), the server's screening of
uploads and fault injection, checkpoints, reports, the run folder and the command line.

Imports run one way: CLI -> simulation -> federated algorithms (`fedamole.fl`) -> layers -> kernels; nothing below
this package imports it. The submodules are imported on use (no eager imports here), so that ``fedamole --help``
stays fast.
"""
