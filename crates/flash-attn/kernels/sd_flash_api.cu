// sd-rbee's entry point into the FlashAttention-2 forward kernels: non-causal attention over dense
// [batch, seqlen, heads, head_dim] tensors, for the (dtype, head-dim) kernels build.rs compiled (it defines
// SDR_FA_<dtype>_<hdim> for each). Returns 0 when a kernel ran, 1 when none was compiled for the shape.
// The parameter set-up follows candle-flash-attn 0.11.1's flash_api.cu with the paged, alibi, rotary and
// windowed paths dropped: the UNet and the VAE use none of them.
#include <cmath>
#include <cstring>
#include <cuda_runtime_api.h>
#include <cutlass/numeric_types.h>
#include "flash.h"

// FlashAttention-2's head-dimension buckets (static_switch.h's HEADDIM_SWITCH).
static int head_dim_bucket(int d) {
    const int buckets[] = {32, 64, 96, 128, 160, 192, 224, 256, 512};
    for (int b : buckets) {
        if (d <= b) return b;
    }
    return -1;
}

#define SDR_CASE(T, D)                                  \
    if (bucket == D) {                                  \
        run_mha_fwd_<T, D, false>(params, stream);      \
        return 0;                                       \
    }

static int dispatch_f16(Flash_fwd_params &params, cudaStream_t stream, int bucket) {
#ifdef SDR_FA_fp16_64
    SDR_CASE(cutlass::half_t, 64)
#endif
#ifdef SDR_FA_fp16_96
    SDR_CASE(cutlass::half_t, 96)
#endif
#ifdef SDR_FA_fp16_160
    SDR_CASE(cutlass::half_t, 160)
#endif
    (void)params; (void)stream; (void)bucket;
    return 1;
}

static int dispatch_bf16(Flash_fwd_params &params, cudaStream_t stream, int bucket) {
#ifdef SDR_FA_bf16_64
    SDR_CASE(cutlass::bfloat16_t, 64)
#endif
#ifdef SDR_FA_bf16_96
    SDR_CASE(cutlass::bfloat16_t, 96)
#endif
#ifdef SDR_FA_bf16_160
    SDR_CASE(cutlass::bfloat16_t, 160)
#endif
    (void)params; (void)stream; (void)bucket;
    return 1;
}

extern "C" int sdr_flash_attn_fwd(
    void *q_ptr, void *k_ptr, void *v_ptr, void *o_ptr, void *softmax_lse_ptr,
    uint32_t q_batch_stride, uint32_t k_batch_stride, uint32_t v_batch_stride, uint32_t o_batch_stride,
    uint32_t q_row_stride, uint32_t k_row_stride, uint32_t v_row_stride, uint32_t o_row_stride,
    uint32_t q_head_stride, uint32_t k_head_stride, uint32_t v_head_stride, uint32_t o_head_stride,
    uint32_t b, uint32_t h, uint32_t d, uint32_t d_rounded, float softmax_scale,
    uint32_t seqlen_q, uint32_t seqlen_k, uint32_t seqlen_q_rounded, uint32_t seqlen_k_rounded,
    int is_bf16, void *stream_ptr) {
    Flash_fwd_params params;
    memset(&params, 0, sizeof(params));
    params.q_ptr = q_ptr;
    params.k_ptr = k_ptr;
    params.v_ptr = v_ptr;
    params.o_ptr = o_ptr;
    params.softmax_lse_ptr = softmax_lse_ptr;
    // Strides are in elements.
    params.q_batch_stride = q_batch_stride;
    params.k_batch_stride = k_batch_stride;
    params.v_batch_stride = v_batch_stride;
    params.o_batch_stride = o_batch_stride;
    params.q_row_stride = q_row_stride;
    params.k_row_stride = k_row_stride;
    params.v_row_stride = v_row_stride;
    params.o_row_stride = o_row_stride;
    params.q_head_stride = q_head_stride;
    params.k_head_stride = k_head_stride;
    params.v_head_stride = v_head_stride;
    params.o_head_stride = o_head_stride;
    params.b = b;
    params.h = h;
    params.h_k = h;
    params.h_h_k_ratio = 1;
    params.seqlen_q = seqlen_q;
    params.seqlen_k = seqlen_k;
    params.seqlen_q_rounded = seqlen_q_rounded;
    params.seqlen_k_rounded = seqlen_k_rounded;
    params.total_q = b * seqlen_q;
    params.d = d;
    params.d_rounded = d_rounded;
    params.softcap = 0.0f;
    params.scale_softmax = softmax_scale;
    params.scale_softmax_log2 = softmax_scale * M_LOG2E;
    params.p_dropout = 1.0f;  // probability to keep
    params.p_dropout_in_uint8_t = uint8_t(255);
    params.rp_dropout = 1.0f;
    params.scale_softmax_rp_dropout = softmax_scale;
    params.is_bf16 = is_bf16 != 0;
    params.is_causal = false;
    params.window_size_left = -1;
    params.window_size_right = -1;
    params.page_block_size = -1;
    params.is_seqlens_k_cumulative = true;
    params.num_splits = 1;
    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
    int bucket = head_dim_bucket(int(d));
    return is_bf16 ? dispatch_bf16(params, stream, bucket) : dispatch_f16(params, stream, bucket);
}
