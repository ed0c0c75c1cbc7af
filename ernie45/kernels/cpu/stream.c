// A pure streaming read: the ceiling the decode matmuls are measured against (benchmarks/bench_int4_bw.py).
// Part of ernie45/kernels/cpu_kernels.c (one translation unit: included there in this order).

// The int32 lanes of buf [bytes] summed (wrap-around) into *out: every byte read once, threads over contiguous
// shares, four independent 64-byte loads an iteration so the loads, not the adds, set the pace. bytes % 256 == 0.
int ernie45_stream_read(const void* buf, int64_t bytes, int64_t* out, int nthreads) {
    if (bytes < 0 || bytes % 256) return -2;
    const int64_t lines = bytes / 256;
    int64_t total = 0;
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads) reduction(+ : total)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t chunk = (lines + nt - 1) / nt, l0 = t * chunk, l1 = l0 + chunk < lines ? l0 + chunk : lines;
        v16i a0 = v16_setzero_si(), a1 = v16_setzero_si(), a2 = v16_setzero_si(), a3 = v16_setzero_si();
        for (int64_t l = l0; l < l1; l++) {
            const char* p = (const char*)buf + l * 256;
            a0 = v16_add_epi32(a0, v16_loadu2_si((const void*)p));
            a1 = v16_add_epi32(a1, v16_loadu2_si((const void*)(p + 64)));
            a2 = v16_add_epi32(a2, v16_loadu2_si((const void*)(p + 128)));
            a3 = v16_add_epi32(a3, v16_loadu2_si((const void*)(p + 192)));
        }
        total += v16_reduce_add_epi32(v16_add_epi32(v16_add_epi32(a0, a1), v16_add_epi32(a2, a3)));
    }
    *out = (int64_t)(int32_t)(uint32_t)total;  // the int32 wrap-around sum, whatever the thread count
    return 0;
}
