"""The benchmark behind scripts/bench, by responsibility (each module imports
only those above it):

- config      what a run is asked to do (sizes, repetitions, groups, paths)
- host        commands, our processes, mounts under the work directory, the
              page cache, files; MeasureError
- results     samples, medians, checks, notes, failures of a run
- workloads   dd, fio and cmp on any file: the measures' actions
- snapfs_side snapfs mounted, snapshots taken, asked and stopped through its
              command line; its processes (the live one and each snapshot's)
- qemu_side   qemu-storage-daemon: QMP, copy-before-write + snapshot-access
              (stacked for several snapshots), image fleecing, blockdev-backup,
              a persistent dirty bitmap (change tracking)
- measures    the measure groups: which workload on which system, filed under
              which key
- harness     the run loop: repetitions, alternating systems, cleanup
              guarantees, the environment check
- report      the markdown report: table, ratios, targets, samples, machine
- cli         the options, and one run from check to report

scripts/bench.py is the entry point; scripts/bench installs what it needs and
runs it.
"""
