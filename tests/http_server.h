// A minimal HTTP/1.1 server on 127.0.0.1 for download tests: canned responses by path, including
// a response cut off before its announced length. Started by the test; never reaches outside.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <thread>

namespace calq_test {

struct HttpResponse {
  int status = 200;
  std::string body;
  std::map<std::string, std::string> headers;
  size_t cut_after = std::string::npos;  // close the connection after this many body bytes
};

class HttpServer {
 public:
  HttpServer() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd_, 16) != 0)
      throw std::runtime_error("test HTTP server: cannot listen on 127.0.0.1");
    socklen_t len = sizeof a;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { loop(); });
  }
  ~HttpServer() {
    stop_ = true;
    thread_.join();
    ::close(fd_);
  }
  void set(const std::string& path, HttpResponse r) {
    std::lock_guard<std::mutex> g(mu_);
    routes_[path] = std::move(r);
  }
  std::string url(const std::string& path) const {
    return "http://127.0.0.1:" + std::to_string(port_) + path;
  }
  int requests() const { return requests_; }

 private:
  void loop() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      int c = ::accept(fd_, nullptr, nullptr);
      if (c < 0) continue;
      serve(c);
      ::close(c);
    }
  }
  void serve(int c) {
    std::string req;
    char buf[4096];
    while (req.find("\r\n\r\n") == std::string::npos) {
      ssize_t n = ::recv(c, buf, sizeof buf, 0);
      if (n <= 0) return;
      req.append(buf, static_cast<size_t>(n));
    }
    ++requests_;
    const size_t sp1 = req.find(' '), sp2 = req.find(' ', sp1 + 1);
    const std::string path = req.substr(sp1 + 1, sp2 - sp1 - 1);
    HttpResponse r;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = routes_.find(path);
      if (it == routes_.end()) r = {404, "not found\n", {}, std::string::npos};
      else r = it->second;
    }
    std::string head = "HTTP/1.1 " + std::to_string(r.status) + (r.status < 400 ? " OK" : " Error") + "\r\n";
    head += "Content-Length: " + std::to_string(r.body.size()) + "\r\nConnection: close\r\n";
    for (auto& [k, v] : r.headers) head += k + ": " + v + "\r\n";
    head += "\r\n";
    const std::string body = r.cut_after == std::string::npos ? r.body : r.body.substr(0, r.cut_after);
    const std::string all = head + body;
    size_t off = 0;
    while (off < all.size()) {
      ssize_t n = ::send(c, all.data() + off, all.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += static_cast<size_t>(n);
    }
  }
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> requests_{0};
  std::mutex mu_;
  std::map<std::string, HttpResponse> routes_;
  std::thread thread_;
};

}  // namespace calq_test
