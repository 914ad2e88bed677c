#include "common/http_framing.h"

#include <boost/beast/http/error.hpp>

#include "absl/strings/str_cat.h"

namespace joule {

std::optional<HttpFramingError> RequestFramingError(const boost::system::error_code& ec,
                                                    int64_t max_body_bytes) {
  namespace bhttp = boost::beast::http;
  if (!ec || &ec.category() != &bhttp::make_error_code(bhttp::error::bad_method).category()) {
    return std::nullopt;  // not the parser's: the socket's, a timer's, or none
  }
  if (ec == bhttp::error::end_of_stream || ec == bhttp::error::partial_message ||
      ec == bhttp::error::need_more || ec == bhttp::error::need_buffer) {
    return std::nullopt;  // the client stopped sending
  }
  if (ec == bhttp::error::body_limit) {
    return HttpFramingError{413, absl::StrCat("the request body exceeds the server's limit of ",
                                              max_body_bytes, " bytes")};
  }
  if (ec == bhttp::error::header_limit) {
    return HttpFramingError{431, absl::StrCat("the request's header fields exceed the server's limit of ",
                                              kMaxHttpHeaderBytes / 1024, " KiB")};
  }
  return HttpFramingError{400, absl::StrCat("malformed HTTP request: ", ec.message())};
}

}  // namespace joule
