// dtype dispatch over the four float types tokred supports.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#define TOKRED_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
