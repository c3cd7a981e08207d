"""Main script of an exported NeuralCPM model (run: python -m cc3d.run_script -i NeuralCPM.cc3d -o OUTDIR)."""
import os

# one BLAS thread (set before numpy loads): the Python energy term's matrices are tiny, threads only cost
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from cc3d import CompuCellSetup
from NeuralCPMSteppables import NeuralCPMEnergySteppable, SnapshotSteppable

# Python energy term (external potential / directed motion / neural terms) over a lattice mirror, if any;
# writes neuralcpm_run.json (MCS/s, callback errors) into the output folder at the end
CompuCellSetup.register_steppable(steppable=NeuralCPMEnergySteppable(frequency=1))
# lattice snapshots (package .npz format) at MCS 0, every 50 MCS and at MCS 1000
CompuCellSetup.register_steppable(steppable=SnapshotSteppable(frequency=1, every=50, last_mcs=1000,
                                                              filename="lattice.npz"))
CompuCellSetup.run()
