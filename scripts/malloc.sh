# Sourced by the scripts that run the suite or the demo: glibc's malloc keeps freed tensors of up to
# 256 MiB in the process more often instead of handing them back to the kernel.
#
# By default glibc maps every allocation above its mmap threshold (which adapts up to 32 MiB at most)
# afresh and unmaps it when freed, so an activation, im2col buffer or Gram chunk of that size is
# page-faulted in again, 4 KiB at a time, each time it is made: kernel time, not computation. A loop
# of 16 and 32 MiB tensors (tests/test_scripts.py) faulted 217k times by default, 70-94k times with
# these settings. Measured on the 2-core AMD EPYC (avx2): tests/deploy/test_export.py +
# tests/ptq/test_pipeline.py 123 s -> 114-118 s wall, system time 14.3 s -> 8.8-9.3 s, peak memory
# 1.27 -> 1.5 GB; the brats_effq bundle's quantize command 21.2-22.9 s -> 20.1-20.2 s. Nothing computed
# changes. A variable already set in the environment wins. Both are needed: the trim threshold alone
# also fixes the mmap threshold at 128 KiB (2.8x slower in that loop's kind of work).
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-268435456}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-268435456}"
