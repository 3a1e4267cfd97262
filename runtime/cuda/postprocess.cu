// Postprocessing on the GPU: logits -> uint8 class map, class map -> frame size, colour overlay.
//
// edgeseg_classify   argmax over classes (first maximum wins, as numpy.argmax), or a threshold for
//                    single-channel outputs; float32 or float16 logits, NCHW or NHWC.
// edgeseg_overlay    per frame pixel: the class under it (nearest, letterbox removed, exactly as
//                    cv2.resize INTER_NEAREST of the cropped map) written to a frame-size class map
//                    and/or blended into the BGR frame: round(frame * (1 - alpha) + colour * alpha).
//
// The per-pixel code is shared with a host loop (compiled without nvcc) that the tests run against
// NumPy/OpenCV on machines without a GPU.

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define ES_FN __host__ __device__ __forceinline__
#else
#include <math.h>
#define ES_FN static inline
#endif

enum { ES_LOGIT_F32 = 0, ES_LOGIT_F16 = 1 };
enum { ES_ARGMAX = 0, ES_THRESHOLD = 1 };

#ifdef __CUDACC__
ES_FN float es_load(const void* p, int dtype, long long i) {
    return dtype == ES_LOGIT_F16 ? __half2float(((const __half*)p)[i]) : ((const float*)p)[i];
}
// Exactly rounded float ops: no FMA contraction, so the blend matches NumPy's float32 arithmetic bit for bit.
ES_FN float es_mul(float a, float b) { return __fmul_rn(a, b); }
ES_FN float es_add(float a, float b) { return __fadd_rn(a, b); }
ES_FN int es_rint(float v) { return __float2int_rn(v); }
ES_FN double es_dmul(double a, double b) { return __dmul_rn(a, b); }
#else
ES_FN float es_load(const void* p, int dtype, long long i) { return ((const float*)p)[i]; }
ES_FN float es_mul(float a, float b) { return a * b; }
ES_FN float es_add(float a, float b) { return a + b; }
ES_FN int es_rint(float v) { return (int)nearbyintf(v); }
ES_FN double es_dmul(double a, double b) { return a * b; }
#endif

// Class of pixel (x, y) of image n. layout 0: NCHW, 1: NHWC.
ES_FN unsigned char es_classify(const void* logits, int dtype, int layout, int n, int c, int h, int w, int x, int y,
                                int mode, float threshold) {
    long long plane = (long long)h * w;
    long long base = layout == 0 ? (long long)n * c * plane + (long long)y * w + x : (((long long)n * h + y) * w + x) * c;
    long long step = layout == 0 ? plane : 1;
    if (mode == ES_THRESHOLD) {
        return es_load(logits, dtype, base) > threshold ? 1 : 0;
    }
    float best = es_load(logits, dtype, base);
    int arg = 0;
    for (int k = 1; k < c; ++k) {
        float v = es_load(logits, dtype, base + k * step);
        if (v > best) { best = v; arg = k; }  // strict: ties keep the first class
    }
    return (unsigned char)arg;
}

// Source index along one axis for cv2.resize INTER_NEAREST: min(floor(d * (1 / (dst / src))), src - 1).
ES_FN int es_nearest(int d, int src, int dst) {
    double inv = 1.0 / ((double)dst / (double)src);
    int s = (int)floor(es_dmul((double)d, inv));
    return s < src - 1 ? s : src - 1;
}

struct EsOverlay {
    const unsigned char* classes;  // (cls_h, cls_w) class map at network resolution
    int cls_w, cls_h;
    int box_top, box_left, box_h, box_w;  // the frame's placement inside it
    int frame_w, frame_h;
    const unsigned char* palette;  // num_classes x 3, BGR
    int num_classes;
    float alpha;
    int skip_background;
};

ES_FN unsigned char es_frame_class(const EsOverlay& o, int x, int y) {
    int cx = o.box_left + es_nearest(x, o.box_w, o.frame_w);
    int cy = o.box_top + es_nearest(y, o.box_h, o.frame_h);
    return o.classes[cy * o.cls_w + cx];
}

ES_FN void es_blend(const EsOverlay& o, unsigned char cls, const unsigned char* in, unsigned char* out) {
    if (cls >= o.num_classes || (o.skip_background && cls == 0)) {
        out[0] = in[0]; out[1] = in[1]; out[2] = in[2];
        return;
    }
    float keep = 1.f - o.alpha;
    for (int k = 0; k < 3; ++k) {
        float v = es_add(es_mul((float)in[k], keep), es_mul((float)o.palette[cls * 3 + k], o.alpha));
        int r = es_rint(v);
        out[k] = (unsigned char)(r < 0 ? 0 : (r > 255 ? 255 : r));
    }
}

#ifdef __CUDACC__

extern "C" __global__ void edgeseg_classify(const void* logits, int dtype, int layout, int n, int c, int h, int w,
                                            int mode, float threshold, unsigned char* out)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    int b = blockIdx.z;
    if (x >= w || y >= h || b >= n) return;
    out[((long long)b * h + y) * w + x] = es_classify(logits, dtype, layout, b, c, h, w, x, y, mode, threshold);
}

// frame/out may be null (class map only); frame_classes may be null (overlay only). out may alias frame.
extern "C" __global__ void edgeseg_overlay(const unsigned char* classes, int cls_w, int cls_h,
                                           int box_top, int box_left, int box_h, int box_w,
                                           const unsigned char* frame, int frame_w, int frame_h, int frame_pitch,
                                           const unsigned char* palette, int num_classes, float alpha,
                                           int skip_background, unsigned char* out, int out_pitch,
                                           unsigned char* frame_classes)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= frame_w || y >= frame_h) return;
    EsOverlay o;
    o.classes = classes; o.cls_w = cls_w; o.cls_h = cls_h;
    o.box_top = box_top; o.box_left = box_left; o.box_h = box_h; o.box_w = box_w;
    o.frame_w = frame_w; o.frame_h = frame_h; o.palette = palette; o.num_classes = num_classes;
    o.alpha = alpha; o.skip_background = skip_background;
    unsigned char cls = es_frame_class(o, x, y);
    if (frame_classes) frame_classes[(long long)y * frame_w + x] = cls;
    if (frame && out) es_blend(o, cls, frame + (long long)y * frame_pitch + 3 * x, out + (long long)y * out_pitch + 3 * x);
}

#else

extern "C" void edgeseg_classify_host(const void* logits, int dtype, int layout, int n, int c, int h, int w,
                                      int mode, float threshold, unsigned char* out)
{
    for (int b = 0; b < n; ++b)
        for (int y = 0; y < h; ++y)
            for (int x = 0; x < w; ++x)
                out[((long long)b * h + y) * w + x] = es_classify(logits, dtype, layout, b, c, h, w, x, y, mode, threshold);
}

extern "C" void edgeseg_overlay_host(const unsigned char* classes, int cls_w, int cls_h,
                                     int box_top, int box_left, int box_h, int box_w,
                                     const unsigned char* frame, int frame_w, int frame_h, int frame_pitch,
                                     const unsigned char* palette, int num_classes, float alpha,
                                     int skip_background, unsigned char* out, int out_pitch,
                                     unsigned char* frame_classes)
{
    EsOverlay o;
    o.classes = classes; o.cls_w = cls_w; o.cls_h = cls_h;
    o.box_top = box_top; o.box_left = box_left; o.box_h = box_h; o.box_w = box_w;
    o.frame_w = frame_w; o.frame_h = frame_h; o.palette = palette; o.num_classes = num_classes;
    o.alpha = alpha; o.skip_background = skip_background;
    for (int y = 0; y < frame_h; ++y)
        for (int x = 0; x < frame_w; ++x) {
            unsigned char cls = es_frame_class(o, x, y);
            if (frame_classes) frame_classes[(long long)y * frame_w + x] = cls;
            if (frame && out) es_blend(o, cls, frame + (long long)y * frame_pitch + 3 * x, out + (long long)y * out_pitch + 3 * x);
        }
}

#endif
