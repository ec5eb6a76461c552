# Sourced by the scripts that run the suite or the demo: glibc's malloc keeps freed tensors of up to
# 256 MiB in the process instead of handing each back to the kernel.
#
# By default glibc maps every allocation above its mmap threshold (at most 32 MiB, however it adapts)
# afresh and unmaps it when freed, so each activation, im2col buffer or Gram chunk of that size costs a
# page fault per 4 KiB page, every time: kernel time, not computation. Measured on the 2-core AMD EPYC
# (avx2): tests/deploy/test_export.py + tests/ptq/test_pipeline.py 123 s -> 114-118 s wall, system time
# 14.3 s -> 8.8-9.3 s, peak memory 1.27 -> 1.5 GB; the brats_effq bundle's quantize command 21.2-22.9 s
# -> 20.1-20.2 s. Nothing computed changes. A variable already set in the environment wins.
# Both are needed: setting the trim threshold alone also fixes the mmap threshold at 128 KiB (3x slower).
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-268435456}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-268435456}"
