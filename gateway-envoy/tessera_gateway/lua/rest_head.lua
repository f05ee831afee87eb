-- Tessera gateway, HEAD requests: the response of a GET without its body (RFC 9110 9.3.2).
--
-- The error filter's request half answers a REST HEAD as its GET (the routes and the http rules know GET only);
-- this filter, outside every filter that writes a body and run only on HEAD requests (a matcher skips every
-- other), drops the body the service, the transcoder or the error filter wrote. The connection manager drops it itself
-- over HTTP/1.1 but not over HTTP/2, where DATA after a HEAD's headers is a protocol error the client resets. The
-- response keeps the GET's content-length.

function envoy_on_response(handle)
  local length = handle:headers():get("content-length")
  local body = handle:body()
  if body ~= nil and body:length() > 0 then body:setBytes("") end
  if length ~= nil then handle:headers():replace("content-length", length) end
end
