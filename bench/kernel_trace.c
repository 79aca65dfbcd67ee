// CUPTI injection library: the GPU start and end of every kernel, memcpy and memset of a CUDA
// process, in the real run (Nsight Compute times kernels one by one; this keeps their order,
// overlap, gaps and the clocks they ran at). Loaded by the driver through
// CUDA_INJECTION64_PATH; writes KTRACE_OUT (default ktrace.csv) at exit, one line per record:
//   K|M|S,start_ns,end_ns,stream,name        (M: memcpy<kind>_<bytes>, S: memset_<bytes>)
// bench/kernel_trace.sh builds and runs it; bench/kernel_trace.py summarises the file.
#include <cupti.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static FILE* out;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static void CUPTIAPI buffer_requested(uint8_t** buf, size_t* size, size_t* max_records) {
    *size = 8 << 20;
    *buf = (uint8_t*)aligned_alloc(8, *size);
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buf, size_t size,
                                      size_t valid) {
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity* r = NULL;
    pthread_mutex_lock(&mu);
    while (cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS) {
        if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
            CUpti_ActivityKernel11* k = (CUpti_ActivityKernel11*)r;
            fprintf(out, "K,%llu,%llu,%u,%s\n", (unsigned long long)k->start,
                    (unsigned long long)k->end, k->streamId, k->name);
        } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            CUpti_ActivityMemcpy6* m = (CUpti_ActivityMemcpy6*)r;
            fprintf(out, "M,%llu,%llu,%u,memcpy%d_%llu\n", (unsigned long long)m->start,
                    (unsigned long long)m->end, m->streamId, (int)m->copyKind,
                    (unsigned long long)m->bytes);
        } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
            CUpti_ActivityMemset4* m = (CUpti_ActivityMemset4*)r;
            fprintf(out, "S,%llu,%llu,%u,memset_%llu\n", (unsigned long long)m->start,
                    (unsigned long long)m->end, m->streamId, (unsigned long long)m->bytes);
        }
    }
    pthread_mutex_unlock(&mu);
    free(buf);
}

static void finish(void) {
    cuptiActivityFlushAll(1);
    if (out) fclose(out);
}

int InitializeInjection(void) {
    const char* path = getenv("KTRACE_OUT");
    out = fopen(path ? path : "ktrace.csv", "w");
    if (!out) return 0;
    cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
    atexit(finish);
    return 1;
}
