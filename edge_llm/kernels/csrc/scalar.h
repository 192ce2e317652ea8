/* One float of any el_dtype (internal): what the kernels and the fused ops both read scales and weights with. */
#ifndef EDGE_LLM_SCALAR_H
#define EDGE_LLM_SCALAR_H

#include <stdint.h>
#include <string.h>

#include "kernels.h"

static inline float el_load_float(const void* p, int dtype, int64_t i) {
  if (dtype == EL_F32) return ((const float*)p)[i];
  if (dtype == EL_F16) return (float)((const _Float16*)p)[i];
  uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16; /* bfloat16: the high half of a float32 */
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

#endif
