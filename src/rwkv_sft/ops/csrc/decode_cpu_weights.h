/* The functions of decode_cpu.c that read weights, for one weight type: included once per type
 * with WEIGHT (the stored type), LOAD(w) (one weight as a float) and NAME(f) (f's name for it). */

/* Columns j0:j1 of y = x Wt for B rows x [B][in], Wt [in][out] row-major (a wide Linear's weight
 * as the Decoder's twin keeps it): for each block of 512 outputs, every row of Wt adds its part, four
 * rows per pass; the rows after the first read the block from cache. */
VECTOR_CLONES static void NAME(columns_of_x_wt)(int B, const float *restrict x, const WEIGHT *restrict Wt,
                                                float *restrict y, int in, int out, int j0, int j1) {
    for (int jb = j0; jb < j1; jb += 512) {
        const int width = j1 - jb < 512 ? j1 - jb : 512;
        for (int b = 0; b < B; b++) {
            const float *xb = x + (long)b * in;
            float acc[512];
            for (int j = 0; j < width; j++) acc[j] = 0.0f;
            int i = 0;
            for (; i + 4 <= in; i += 4) {
                const float x0 = xb[i], x1 = xb[i + 1], x2 = xb[i + 2], x3 = xb[i + 3];
                const WEIGHT *w0 = Wt + (long)i * out + jb, *w1 = w0 + out, *w2 = w1 + out, *w3 = w2 + out;
                for (int j = 0; j < width; j++)
                    acc[j] += x0 * LOAD(w0[j]) + x1 * LOAD(w1[j]) + x2 * LOAD(w2[j]) + x3 * LOAD(w3[j]);
            }
            for (; i < in; i++) {
                const float xi = xb[i];
                const WEIGHT *w = Wt + (long)i * out + jb;
                for (int j = 0; j < width; j++) acc[j] += xi * LOAD(w[j]);
            }
            for (int j = 0; j < width; j++) y[(long)b * out + jb + j] = acc[j];
        }
    }
}

/* Outputs r0:r1 of y = x W^T for B rows x [B][in], W [out][in] row-major: one dot product per
 * row of W and of x, in 16 partial sums. */
VECTOR_CLONES static void NAME(rows_of_w_x)(int B, const float *restrict x, const WEIGHT *restrict W,
                                            float *restrict y, int in, int out, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        const WEIGHT *w = W + (long)r * in;
        for (int b = 0; b < B; b++) {
            const float *xb = x + (long)b * in;
            float part[16] = {0.0f}, sum = 0.0f;
            int i = 0;
            for (; i + 16 <= in; i += 16)
                for (int q = 0; q < 16; q++) part[q] += LOAD(w[i + q]) * xb[i + q];
            for (; i < in; i++) sum += LOAD(w[i]) * xb[i];
            for (int q = 0; q < 16; q++) sum += part[q];
            y[(long)b * out + r] = sum;
        }
    }
}

/* y [B][out] = x W^T for B rows x [B][in], W the weight [out][in] of a Linear; stored transposed
 * ([in][out] row-major) when transposed is 1. The threads (torch's OpenMP pool, whose size
 * torch.set_num_threads sets) each take a share of the outputs; the weights are streamed once. */
void NAME(rwkv7_matvec)(int B, const float *x, const WEIGHT *W, float *y, int in, int out, int transposed) {
#pragma omp parallel
    {
        int begin, end;
        share(out, 16, &begin, &end);
        if (transposed)
            NAME(columns_of_x_wt)(B, x, W, y, in, out, begin, end);
        else
            NAME(rows_of_w_x)(B, x, W, y, in, out, begin, end);
    }
}

/* A block's entry to its time mix or channel mix, for every row b of [B,C]:
 *   x += dx (the previous mix's output, when dx is not NULL), normed = layer_norm(x),
 *   out[m] = normed + (last - normed) * mix[m] for m < count (the token-shift mixes). */
void NAME(rwkv7_add_norm_mix)(int B, int C, float *x, const float *dx, const WEIGHT *ln_w, const WEIGHT *ln_b,
                        float eps, float *normed, const float *last, int count, const WEIGHT *const *mix,
                        float *out) {
    for (int b = 0; b < B; b++) {
        float *xb = x + (long)b * C, *nb = normed + (long)b * C;
        const float *lb = last ? last + (long)b * C : 0;
        double mean = 0.0, var = 0.0;
        for (int c = 0; c < C; c++) {
            if (dx) xb[c] += dx[(long)b * C + c];
            mean += xb[c];
        }
        mean /= C;
        for (int c = 0; c < C; c++) var += (xb[c] - mean) * (xb[c] - mean);
        const float m = (float)mean, rstd = (float)(1.0 / sqrt(var / C + eps));
        for (int c = 0; c < C; c++) nb[c] = (xb[c] - m) * rstd * LOAD(ln_w[c]) + LOAD(ln_b[c]);
        for (int k = 0; k < count; k++) {
            float *o = out + ((long)k * B + b) * C;
            for (int c = 0; c < C; c++) o[c] = nb[c] + (lb[c] - nb[c]) * LOAD(mix[k][c]);
        }
    }
}

/* y = x W for one row x [rows] and W [rows][cols] row-major (as w1, w2, a1, ... are stored):
 * W is streamed once, row by row, and each row's contribution vectorises over cols. */
static void NAME(vec_mat)(const float *restrict x, const WEIGHT *restrict W, int rows, int cols, float *restrict y) {
    for (int j = 0; j < cols; j++) y[j] = 0.0f;
    for (int i = 0; i < rows; i++) {
        const float xi = x[i];
        const WEIGHT *restrict w = W + (long)i * cols;
        for (int j = 0; j < cols; j++) y[j] += xi * LOAD(w[j]);
    }
}

/* The time mix between its projections and its output projection, for every row b and head h:
 *   the low-rank products w_lora = tanh(xw w1) w2, a_lora = (xa a1) a2, v_lora = (xv v1) v2 and
 *   g = sigmoid(xg g1) g2 (written to lora [4,B,C] in that order),
 *   a = sigmoid(a0 + a_lora), kk = normalize(k * k_k), k' = k (1 + (a - 1) k_a),
 *   v' = v (layer 0, which also writes v_first) or lerp(v, v_first, sigmoid(v0 + v_lora)),
 *   S' = S diag(decay) - (S kk) (kk a)^T + v' k'^T, decay = exp(-e^-0.5 sigmoid(w0 + w_lora)),
 *   out = (group_norm(S' r) + (sum r k' r_k) v') * g.
 * S and S_out are [B,H,N,N] (value x key); every vector is [B, C = H N], every parameter [C]
 * or, for the low-rank weights, [C][d] and [d][C]. Layer 0 has no v0, v1, v2 (NULL). */
void NAME(rwkv7_time_mix)(int B, int H, int N, int first_layer,
                    const float *r, const float *k, const float *v,
                    const float *xw, const float *xa, const float *xv, const float *xg,
                    const WEIGHT *w1, const WEIGHT *w2, int dw, const WEIGHT *a1, const WEIGHT *a2, int da,
                    const WEIGHT *v1, const WEIGHT *v2, int dv, const WEIGHT *g1, const WEIGHT *g2, int dg,
                    const WEIGHT *w0, const WEIGHT *a0, const WEIGHT *v0, float *v_first,
                    const WEIGHT *k_k, const WEIGHT *k_a, const WEIGHT *r_k,
                    const WEIGHT *ln_w, const WEIGHT *ln_b, float ln_eps,
                    const float *S, float *S_out, float *lora, float *out) {
    const int C = H * N;
    const long BC = (long)B * C;
    float *w_lora = lora, *a_lora = lora + BC, *v_lora = lora + 2 * BC, *g = lora + 3 * BC;
    for (int b = 0; b < B; b++) {
        const long o = (long)b * C;
        float hidden[max(max(dw, da), max(dv, dg))];
        NAME(vec_mat)(xw + o, w1, C, dw, hidden);
        for (int i = 0; i < dw; i++) hidden[i] = tanhf(hidden[i]);
        NAME(vec_mat)(hidden, w2, dw, C, w_lora + o);
        NAME(vec_mat)(xa + o, a1, C, da, hidden);
        NAME(vec_mat)(hidden, a2, da, C, a_lora + o);
        if (!first_layer) {
            NAME(vec_mat)(xv + o, v1, C, dv, hidden);
            NAME(vec_mat)(hidden, v2, dv, C, v_lora + o);
        }
        NAME(vec_mat)(xg + o, g1, C, dg, hidden);
        for (int i = 0; i < dg; i++) hidden[i] = sigmoid(hidden[i]);
        NAME(vec_mat)(hidden, g2, dg, C, g + o);
    }
    float scratch[5 * N];
    float *kk = scratch, *kb = scratch + N, *kd = scratch + 2 * N, *decay = scratch + 3 * N, *vd = scratch + 4 * N;
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            const long o = (long)b * C + (long)h * N;  /* this head's slice of a [B,C] vector */
            const float *rh = r + o, *kh = k + o, *vh = v + o;
            float norm = 0.0f;
            for (int n = 0; n < N; n++) {
                kk[n] = kh[n] * LOAD(k_k[h * N + n]);
                norm += kk[n] * kk[n];
            }
            const float inv = 1.0f / fmaxf(sqrtf(norm), 1e-12f);
            float bonus = 0.0f;
            for (int n = 0; n < N; n++) {
                const float a = sigmoid(LOAD(a0[h * N + n]) + a_lora[o + n]);
                kk[n] *= inv;
                kb[n] = kk[n] * a;
                kd[n] = kh[n] * (1.0f + (a - 1.0f) * LOAD(k_a[h * N + n]));
                decay[n] = expf(NEG_EXP_HALF * sigmoid(LOAD(w0[h * N + n]) + w_lora[o + n]));
                bonus += rh[n] * kd[n] * LOAD(r_k[h * N + n]);
            }
            const float *Sh = S + ((long)b * H + h) * N * N;
            float *Sh_out = S_out + ((long)b * H + h) * N * N, *y = out + o;
            float mean = 0.0f;
            for (int j = 0; j < N; j++) {
                float vj = vh[j];
                if (first_layer)
                    v_first[o + j] = vj;
                else
                    vj += (v_first[o + j] - vj) * sigmoid(LOAD(v0[h * N + j]) + v_lora[o + j]);
                const float *row = Sh + (long)j * N;
                float *row_out = Sh_out + (long)j * N;
                const float sa = -dot(row, kk, N);
                for (int n = 0; n < N; n++) row_out[n] = row[n] * decay[n] + sa * kb[n] + vj * kd[n];
                const float yj = dot(row_out, rh, N);
                y[j] = yj;
                mean += yj;
                vd[j] = vj;
            }
            mean /= N;
            float var = 0.0f;
            for (int j = 0; j < N; j++) var += (y[j] - mean) * (y[j] - mean);
            const float rstd = 1.0f / sqrtf(var / N + ln_eps);
            for (int j = 0; j < N; j++) {
                const int c = h * N + j;
                y[j] = ((y[j] - mean) * rstd * LOAD(ln_w[c]) + LOAD(ln_b[c]) + bonus * vd[j]) * g[o + j];
            }
        }
    }
}

