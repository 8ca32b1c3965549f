/*
 * cinemae fused LCAS-statistics kernel: plain C ABI (DESIGN.md section 1 "LCAS" and
 * "Summary statistics", section 2 "LCAS statistics").
 *
 * This header needs no CUDA header: the stream is passed as `void*` (a cudaStream_t / CUstream,
 * NULL for the legacy default stream) and the return value is a cudaError_t value as an int
 * (0 = cudaSuccess, 1 = cudaErrorInvalidValue for arguments the kernel cannot take).
 *
 * All pointers except `stream` are device pointers in the calling thread's current context.
 *
 *   image     [B, 3, H, W] float32, NCHW, the normalised image batch
 *   pred      [B*K, L, P*P*3] of pred_dtype: float32 (CINEMAE_LCAS_PRED_F32) or IEEE half
 *             (CINEMAE_LCAS_PRED_F16); any other value is cudaErrorInvalidValue. The
 *             decoder output; row b*K + k is image b under masking run k; inside a patch the
 *             element d = (p*P + q)*3 + c is channel-last as MAE patchify; patch i is row-major
 *             over the (H/P) x (W/P) grid, L = (H/P)*(W/P)
 *   visible   [K, L] uint8, nonzero where patch i is visible (kept) in run k
 *   lambda    weight of the reconstruction error in LCAS = dev + lambda * err
 *   norm_pix  nonzero: targets are standardised per patch, (t - mean) / sqrt(var_unbiased + 1e-6)
 *   stats_out [B, 3] float32: (s1 population std of all masked LCAS of the image over all runs,
 *             s2 their mean, s3 population std over runs of the per-run means; s3 = 0 when
 *             K = 1; all zero when K = 0)
 *   map_out   [B, K, L] float32 per-patch LCAS with NaN at visible patches, or NULL to skip
 *
 * Limits: P <= 16 (every MAE checkpoint), H and W multiples of P, 3*H*W < 2^31. Per image
 * (one thread block) the kernel keeps its working set in the 48 KiB of shared memory every CUDA
 * GPU gives without opt-in (exact formula: smem_bytes in lcas.cu): one pass over the image when
 * 13*K*L + 872*K + 12*P*P <= 49152 bytes (B <= 128; 456*K for larger batches), so up to
 * L = 376 at K = 8, P = 16, which covers ViT-L/16 and ViT-H/14 at 224 px; otherwise two passes
 * when K*L + 872*K + 12*P*P <= 49152 (K = 8, P = 16: L <= 4888); larger shapes return
 * cudaErrorInvalidValue without launching. B = 0 launches nothing. The work is queued on
 * `stream`; the function does not synchronise.
 * Results are deterministic (fixed reduction order) for a given GPU architecture.
 */
#ifndef CINEMAE_LCAS_H
#define CINEMAE_LCAS_H

#if defined(_WIN32)
#if defined(CINEMAE_LCAS_BUILD)
#define CINEMAE_LCAS_API __declspec(dllexport)
#else
#define CINEMAE_LCAS_API __declspec(dllimport)
#endif
#else
#define CINEMAE_LCAS_API __attribute__((visibility("default")))
#endif

/* ABI 2: the third argument is a dtype code (ABI 1 took a flag, nonzero meaning half). */
#define CINEMAE_LCAS_ABI_VERSION 2

/* pred_dtype codes */
#define CINEMAE_LCAS_PRED_F32 0
#define CINEMAE_LCAS_PRED_F16 1

#ifdef __cplusplus
extern "C" {
#endif

/* Queue the fused kernel on `stream`; returns a cudaError_t value (0 on success). */
CINEMAE_LCAS_API int cinemae_lcas_stats(const float* image, const void* pred, int pred_dtype,
                                        const unsigned char* visible, int B, int K, int H, int W,
                                        int P, float lambda, int norm_pix, float* stats_out,
                                        float* map_out, void* stream);

/* CINEMAE_LCAS_ABI_VERSION of the library actually loaded. */
CINEMAE_LCAS_API int cinemae_lcas_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* CINEMAE_LCAS_H */
