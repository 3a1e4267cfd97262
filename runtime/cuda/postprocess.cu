// Postprocessing on the GPU: network scores -> frame-size class map -> colour overlay.
//
// edgeseg_classify   per frame pixel: the class of the bilinearly upsampled scores, letterbox removed,
//                    exactly as runtime.postprocess.Upsampler computes it on the CPU: where the four
//                    score pixels around the sample share their argmax, that class (a convex
//                    combination keeps it); elsewhere the argmax over classes of the interpolated
//                    scores, top + (bottom - top) * wy with top/bottom = a + (b - a) * wx in float32;
//                    at the score map's own size, the argmax itself.
//                    argmax follows numpy.argmax: the first maximum wins, and the first NaN wins over
//                    any number. One score channel: score > threshold. float32 or float16 scores, NCHW
//                    or NHWC; then an optional 256-entry lookup table (hidden classes -> fill).
// edgeseg_overlay    per frame pixel: round(frame * (1 - alpha) + colour * alpha) where the class is
//                    drawn (draw[cls] != 0), the frame itself elsewhere.
//
// The per-pixel code is shared with a host loop (compiled without nvcc) that the tests run against
// the CPU path on machines without a GPU. Arithmetic is written with exactly rounded operations (no
// fused multiply-add on either side), so both builds and NumPy round alike.

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define ES_FN __host__ __device__ __forceinline__
#else
#include <math.h>
#define ES_FN static inline
#endif

enum { ES_LOGIT_F32 = 0, ES_LOGIT_F16 = 1 };
enum { ES_ARGMAX = 0, ES_THRESHOLD = 1 };
enum { ES_NCHW = 0, ES_NHWC = 1 };

#ifdef __CUDACC__
ES_FN float es_load(const void* p, int dtype, long long i) {
    return dtype == ES_LOGIT_F16 ? __half2float(((const __half*)p)[i]) : ((const float*)p)[i];
}
ES_FN float es_mul(float a, float b) { return __fmul_rn(a, b); }
ES_FN float es_add(float a, float b) { return __fadd_rn(a, b); }
ES_FN float es_sub(float a, float b) { return __fsub_rn(a, b); }
ES_FN int es_rint(float v) { return __float2int_rn(v); }
ES_FN double es_dmul(double a, double b) { return __dmul_rn(a, b); }
ES_FN double es_dadd(double a, double b) { return __dadd_rn(a, b); }
ES_FN double es_ddiv(double a, double b) { return __ddiv_rn(a, b); }
#else
ES_FN float es_load(const void* p, int dtype, long long i) { return ((const float*)p)[i]; }
ES_FN float es_mul(float a, float b) { return a * b; }
ES_FN float es_add(float a, float b) { return a + b; }
ES_FN float es_sub(float a, float b) { return a - b; }
ES_FN int es_rint(float v) { return (int)nearbyintf(v); }
ES_FN double es_dmul(double a, double b) { return a * b; }
ES_FN double es_dadd(double a, double b) { return a + b; }
ES_FN double es_ddiv(double a, double b) { return a / b; }
#endif

ES_FN bool es_isnan(float v) { return v != v; }

struct EsScores {
    const void* data;
    int dtype, layout, c, h, w;
};

// Index of class k at score pixel (x, y) of image 0.
ES_FN long long es_at(const EsScores& s, int k, int x, int y) {
    return s.layout == ES_NCHW ? ((long long)k * s.h + y) * s.w + x : ((long long)y * s.w + x) * s.c + k;
}

// numpy.argmax over classes at one score pixel: the first maximum, or the first NaN.
ES_FN int es_argmax_at(const EsScores& s, int x, int y) {
    float best = es_load(s.data, s.dtype, es_at(s, 0, x, y));
    if (es_isnan(best)) return 0;
    int arg = 0;
    for (int k = 1; k < s.c; ++k) {
        float v = es_load(s.data, s.dtype, es_at(s, k, x, y));
        if (es_isnan(v)) return k;
        if (v > best) { best = v; arg = k; }  // strict: ties keep the first class
    }
    return arg;
}

// Source index pair and weight of output position d along one axis, as runtime.postprocess.bilinear_axis
// (cv2.INTER_LINEAR: half-pixel centres, clamped at the borders), in double then the weight in float.
ES_FN void es_axis(int d, int n_in, int n_out, int* i0, int* i1, float* w) {
    double scale = es_ddiv((double)n_in, (double)n_out);
    double f = es_dadd(es_dmul(es_dadd((double)d, 0.5), scale), -0.5);
    double fl = floor(f);
    int i = (int)fl;
    double frac = es_dadd(f, -fl);
    if (i < 0) { i = 0; frac = 0.0; }
    if (i >= n_in - 1) { i = n_in - 1; frac = 0.0; }
    *i0 = i;
    *i1 = i + 1 < n_in ? i + 1 : n_in - 1;
    *w = (float)frac;
}

// Interpolated score of class k from the four corners (float32, the CPU's order of operations).
ES_FN float es_lerp2(const EsScores& s, int k, int x0, int x1, int y0, int y1, float wx, float wy) {
    float a = es_load(s.data, s.dtype, es_at(s, k, x0, y0));
    float b = es_load(s.data, s.dtype, es_at(s, k, x1, y0));
    float c = es_load(s.data, s.dtype, es_at(s, k, x0, y1));
    float d = es_load(s.data, s.dtype, es_at(s, k, x1, y1));
    float top = es_add(a, es_mul(es_sub(b, a), wx));
    float bottom = es_add(c, es_mul(es_sub(d, c), wx));
    return es_add(top, es_mul(es_sub(bottom, top), wy));
}

struct EsClassify {
    EsScores s;
    int box_top, box_left, box_h, box_w;  // the frame's placement in the score map (letterbox)
    int frame_w, frame_h;
    int mode;
    float threshold;
    const unsigned char* lut;  // 256 entries or null
};

ES_FN unsigned char es_frame_class(const EsClassify& p, int x, int y) {
    if (p.mode == ES_ARGMAX && p.box_w == p.frame_w && p.box_h == p.frame_h) {  // no resize: the argmax itself
        int cls = es_argmax_at(p.s, x + p.box_left, y + p.box_top);
        return p.lut ? p.lut[cls & 255] : (unsigned char)cls;
    }
    int x0, x1, y0, y1;
    float wx, wy;
    es_axis(x, p.box_w, p.frame_w, &x0, &x1, &wx);
    es_axis(y, p.box_h, p.frame_h, &y0, &y1, &wy);
    x0 += p.box_left; x1 += p.box_left; y0 += p.box_top; y1 += p.box_top;
    int cls;
    if (p.mode == ES_THRESHOLD) {
        cls = es_lerp2(p.s, 0, x0, x1, y0, y1, wx, wy) > p.threshold ? 1 : 0;
    } else {
        int a = es_argmax_at(p.s, x0, y0);
        if (a == es_argmax_at(p.s, x1, y0) && a == es_argmax_at(p.s, x0, y1) && a == es_argmax_at(p.s, x1, y1)) {
            cls = a;  // a uniform cell: every sample inside it has this class
        } else {
            float best = es_lerp2(p.s, 0, x0, x1, y0, y1, wx, wy);
            cls = 0;
            if (!es_isnan(best)) {
                for (int k = 1; k < p.s.c; ++k) {
                    float v = es_lerp2(p.s, k, x0, x1, y0, y1, wx, wy);
                    if (es_isnan(v)) { cls = k; break; }
                    if (v > best) { best = v; cls = k; }
                }
            }
        }
    }
    return p.lut ? p.lut[cls & 255] : (unsigned char)cls;
}

struct EsOverlay {
    const unsigned char* palette;  // 256 x 3, BGR
    const unsigned char* draw;     // 256 flags: draw this class
    float alpha;
};

ES_FN void es_blend(const EsOverlay& o, unsigned char cls, const unsigned char* in, unsigned char* out) {
    if (!o.draw[cls]) {
        out[0] = in[0]; out[1] = in[1]; out[2] = in[2];
        return;
    }
    float keep = es_sub(1.f, o.alpha);
    for (int k = 0; k < 3; ++k) {
        float v = es_add(es_mul((float)in[k], keep), es_mul((float)o.palette[cls * 3 + k], o.alpha));
        int r = es_rint(v);
        out[k] = (unsigned char)(r < 0 ? 0 : (r > 255 ? 255 : r));
    }
}

#define ES_CLASSIFY_PARAMS                                                                                  \
    const void *scores, int dtype, int layout, int c, int h, int w, int box_top, int box_left, int box_h,   \
        int box_w, int frame_w, int frame_h, int mode, float threshold, const unsigned char *lut,           \
        unsigned char *out

#define ES_CLASSIFY_SETUP                                                                                   \
    EsClassify p;                                                                                           \
    p.s.data = scores; p.s.dtype = dtype; p.s.layout = layout; p.s.c = c; p.s.h = h; p.s.w = w;             \
    p.box_top = box_top; p.box_left = box_left; p.box_h = box_h; p.box_w = box_w;                           \
    p.frame_w = frame_w; p.frame_h = frame_h; p.mode = mode; p.threshold = threshold; p.lut = lut;

#define ES_OVERLAY_PARAMS                                                                                   \
    const unsigned char *classes, int frame_w, int frame_h, const unsigned char *frame, int frame_pitch,    \
        const unsigned char *palette, const unsigned char *draw, float alpha, unsigned char *out, int out_pitch

#ifdef __CUDACC__

// Grid: 2D over the frame (x, y).
extern "C" __global__ void edgeseg_classify(ES_CLASSIFY_PARAMS)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= frame_w || y >= frame_h) return;
    ES_CLASSIFY_SETUP
    out[(long long)y * frame_w + x] = es_frame_class(p, x, y);
}

// out may alias frame (drawing in place).
extern "C" __global__ void edgeseg_overlay(ES_OVERLAY_PARAMS)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= frame_w || y >= frame_h) return;
    EsOverlay o;
    o.palette = palette; o.draw = draw; o.alpha = alpha;
    es_blend(o, classes[(long long)y * frame_w + x], frame + (long long)y * frame_pitch + 3 * x,
             out + (long long)y * out_pitch + 3 * x);
}

#else

extern "C" void edgeseg_classify_host(ES_CLASSIFY_PARAMS)
{
    ES_CLASSIFY_SETUP
    for (int y = 0; y < frame_h; ++y)
        for (int x = 0; x < frame_w; ++x)
            out[(long long)y * frame_w + x] = es_frame_class(p, x, y);
}

extern "C" void edgeseg_overlay_host(ES_OVERLAY_PARAMS)
{
    EsOverlay o;
    o.palette = palette; o.draw = draw; o.alpha = alpha;
    for (int y = 0; y < frame_h; ++y)
        for (int x = 0; x < frame_w; ++x)
            es_blend(o, classes[(long long)y * frame_w + x], frame + (long long)y * frame_pitch + 3 * x,
                     out + (long long)y * out_pitch + 3 * x);
}

#endif
