// Fused preprocessing: one uint8 camera frame (BGR, RGB or NV12) -> the network input, in one pass.
//
// Per output pixel: map to the source (stretch or letterbox geometry from edgeseg.spec.Preprocess),
// bilinear sample with half-pixel centres and clamped edges (OpenCV INTER_LINEAR on a float32
// image), reorder channels, normalise ((v / 255 - mean) / std) and store as float32, float16 or
// uint8 in CHW or HWC layout, straight into the engine's input buffer.
//
// NV12 is converted per sample with OpenCV's fixed-point BT.601 (COLOR_YUV2BGR_NV12) formula, so
// sampling converted taps equals converting the frame first and resizing afterwards.
//
// The per-pixel code is plain C++ shared by the kernel and a host loop (compiled without nvcc) that
// the test suite runs against the NumPy/OpenCV reference on machines without a GPU.

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define ES_FN __host__ __device__ __forceinline__
#else
#include <math.h>
#include <stdint.h>
#define ES_FN static inline
#endif

enum { ES_SRC_BGR = 0, ES_SRC_RGB = 1, ES_SRC_NV12 = 2 };
enum { ES_OUT_F32 = 0, ES_OUT_F16 = 1, ES_OUT_U8 = 2 };
enum { ES_NCHW = 0, ES_NHWC = 1 };

struct EsPre {
    const unsigned char* src;  // BGR/RGB interleaved, or the NV12 Y plane
    const unsigned char* uv;   // NV12 interleaved UV plane (half height), else unused
    int src_w, src_h, src_pitch, uv_pitch, src_format;
    int dst_w, dst_h;                  // network input size
    int box_top, box_left, box_h, box_w;  // where the resized frame sits (letterbox), whole input when stretching
    double scale_x, scale_y;           // source pixels per resized pixel (1 / (box / src), as OpenCV)
    int out_rgb;                       // 1: channel 0 of the output is red
    float pad;                         // 0..255 value of letterbox padding
    float mean[3], inv_std[3];         // in output channel order, on 0..1 values
    int normalize;                     // 0 for uint8 graphs: the resized 0..255 value itself
};

ES_FN int es_clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

ES_FN unsigned char es_sat_u8(int v) { return (unsigned char)(v < 0 ? 0 : (v > 255 ? 255 : v)); }

// One source pixel as R, G, B floats (0..255).
ES_FN void es_fetch(const EsPre& p, int x, int y, float rgb[3]) {
    if (p.src_format == ES_SRC_NV12) {
        // OpenCV color_yuv: ITU-R BT.601, limited range, 20-bit fixed point.
        const int CY = 1220542, CUB = 2116026, CUG = -409993, CVG = -852492, CVR = 1673527, SHIFT = 20;
        int yy = (int)p.src[y * p.src_pitch + x];
        const unsigned char* uvp = p.uv + (y >> 1) * p.uv_pitch + (x & ~1);
        int u = (int)uvp[0] - 128, v = (int)uvp[1] - 128;
        int ruv = (1 << (SHIFT - 1)) + CVR * v;
        int guv = (1 << (SHIFT - 1)) + CVG * v + CUG * u;
        int buv = (1 << (SHIFT - 1)) + CUB * u;
        int yv = (yy - 16 > 0 ? yy - 16 : 0) * CY;
        rgb[0] = (float)es_sat_u8((yv + ruv) >> SHIFT);
        rgb[1] = (float)es_sat_u8((yv + guv) >> SHIFT);
        rgb[2] = (float)es_sat_u8((yv + buv) >> SHIFT);
        return;
    }
    const unsigned char* px = p.src + y * p.src_pitch + 3 * x;
    if (p.src_format == ES_SRC_BGR) {
        rgb[0] = (float)px[2]; rgb[1] = (float)px[1]; rgb[2] = (float)px[0];
    } else {
        rgb[0] = (float)px[0]; rgb[1] = (float)px[1]; rgb[2] = (float)px[2];
    }
}

// Source coordinate and weight along one axis, as OpenCV's INTER_LINEAR computes them.
ES_FN void es_coord(int d, double scale, int n, int* i0, int* i1, float* w) {
    // In double, then rounded to float, like OpenCV: a float product would be off by up to 1e-4 px at 1080p.
    float f = (float)(((double)d + 0.5) * scale - 0.5);
    int i = (int)floorf(f);
    f -= (float)i;
    if (i < 0) { i = 0; f = 0.f; }
    if (i >= n - 1) { i = n - 1; f = 0.f; }
    *i0 = i;
    *i1 = i + 1 < n ? i + 1 : n - 1;
    *w = f;
}

// The output value of pixel (x, y) for the three output channels (model colour order).
ES_FN void es_pixel(const EsPre& p, int x, int y, float out[3]) {
    float rgb[3];
    int bx = x - p.box_left, by = y - p.box_top;
    if (bx < 0 || by < 0 || bx >= p.box_w || by >= p.box_h) {
        rgb[0] = rgb[1] = rgb[2] = p.pad;
    } else {
        int x0, x1, y0, y1;
        float fx, fy;
        es_coord(bx, p.scale_x, p.src_w, &x0, &x1, &fx);
        es_coord(by, p.scale_y, p.src_h, &y0, &y1, &fy);
        float a[3], b[3], c[3], d[3];
        es_fetch(p, x0, y0, a);
        es_fetch(p, x1, y0, b);
        es_fetch(p, x0, y1, c);
        es_fetch(p, x1, y1, d);
        for (int k = 0; k < 3; ++k) {
            // Horizontal then vertical, as OpenCV's separable resize does.
            float top = a[k] * (1.f - fx) + b[k] * fx;
            float bot = c[k] * (1.f - fx) + d[k] * fx;
            rgb[k] = top * (1.f - fy) + bot * fy;
        }
    }
    for (int k = 0; k < 3; ++k) {
        float v = rgb[p.out_rgb ? k : 2 - k];
        out[k] = p.normalize ? (v * (1.f / 255.f) - p.mean[k]) * p.inv_std[k] : v;
    }
}

ES_FN long long es_index(const EsPre& p, int layout, int x, int y, int k) {
    return layout == ES_NCHW ? ((long long)k * p.dst_h + y) * p.dst_w + x : ((long long)y * p.dst_w + x) * 3 + k;
}

#ifdef __CUDACC__

// Grid: 2D over the network input (x, y); one thread writes the three channels of one pixel.
extern "C" __global__ void edgeseg_preprocess(
    const unsigned char* src, const unsigned char* uv, int src_w, int src_h, int src_pitch, int uv_pitch,
    int src_format, void* dst, int dst_w, int dst_h, int out_dtype, int layout,
    int box_top, int box_left, int box_h, int box_w, double scale_x, double scale_y, int out_rgb, float pad,
    float m0, float m1, float m2, float s0, float s1, float s2, int normalize)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= dst_w || y >= dst_h) return;
    EsPre p;
    p.src = src; p.uv = uv; p.src_w = src_w; p.src_h = src_h; p.src_pitch = src_pitch; p.uv_pitch = uv_pitch;
    p.src_format = src_format; p.dst_w = dst_w; p.dst_h = dst_h;
    p.box_top = box_top; p.box_left = box_left; p.box_h = box_h; p.box_w = box_w;
    p.scale_x = scale_x; p.scale_y = scale_y; p.out_rgb = out_rgb; p.pad = pad;
    p.mean[0] = m0; p.mean[1] = m1; p.mean[2] = m2;
    p.inv_std[0] = s0; p.inv_std[1] = s1; p.inv_std[2] = s2;
    p.normalize = normalize;
    float v[3];
    es_pixel(p, x, y, v);
    for (int k = 0; k < 3; ++k) {
        long long i = es_index(p, layout, x, y, k);
        if (out_dtype == ES_OUT_F32) {
            ((float*)dst)[i] = v[k];
        } else if (out_dtype == ES_OUT_F16) {
            ((__half*)dst)[i] = __float2half_rn(v[k]);
        } else {
            ((unsigned char*)dst)[i] = es_sat_u8(__float2int_rn(v[k]));
        }
    }
}

#else

// Host build of the same arithmetic (float32 and uint8 outputs), for checking without a GPU.
extern "C" void edgeseg_preprocess_host(
    const unsigned char* src, const unsigned char* uv, int src_w, int src_h, int src_pitch, int uv_pitch,
    int src_format, void* dst, int dst_w, int dst_h, int out_dtype, int layout,
    int box_top, int box_left, int box_h, int box_w, double scale_x, double scale_y, int out_rgb, float pad,
    float m0, float m1, float m2, float s0, float s1, float s2, int normalize)
{
    EsPre p;
    p.src = src; p.uv = uv; p.src_w = src_w; p.src_h = src_h; p.src_pitch = src_pitch; p.uv_pitch = uv_pitch;
    p.src_format = src_format; p.dst_w = dst_w; p.dst_h = dst_h;
    p.box_top = box_top; p.box_left = box_left; p.box_h = box_h; p.box_w = box_w;
    p.scale_x = scale_x; p.scale_y = scale_y; p.out_rgb = out_rgb; p.pad = pad;
    p.mean[0] = m0; p.mean[1] = m1; p.mean[2] = m2;
    p.inv_std[0] = s0; p.inv_std[1] = s1; p.inv_std[2] = s2;
    p.normalize = normalize;
    for (int y = 0; y < dst_h; ++y) {
        for (int x = 0; x < dst_w; ++x) {
            float v[3];
            es_pixel(p, x, y, v);
            for (int k = 0; k < 3; ++k) {
                long long i = es_index(p, layout, x, y, k);
                if (out_dtype == ES_OUT_U8) {
                    ((unsigned char*)dst)[i] = es_sat_u8((int)nearbyintf(v[k]));
                } else {
                    ((float*)dst)[i] = v[k];
                }
            }
        }
    }
}

#endif
