// calq::Error — the one exception type of the library. Every error carries a message that names
// the file, tensor, option or line it is about; callers add context as the error travels up.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace calq {

class Error : public std::runtime_error {
 public:
  explicit Error(std::string message) : std::runtime_error(std::move(message)) {}
};

// Throws calq::Error with a fmt-formatted message.
template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

// Runs fn(); if it throws calq::Error, rethrows with "context: " prepended.
template <typename Fn>
decltype(auto) with_context(const std::string& context, Fn&& fn) {
  try {
    return fn();
  } catch (const Error& e) {
    throw Error(context + ": " + e.what());
  }
}

}  // namespace calq

#define CALQ_CHECK(cond, ...)        \
  do {                               \
    if (!(cond)) ::calq::fail(__VA_ARGS__); \
  } while (0)
