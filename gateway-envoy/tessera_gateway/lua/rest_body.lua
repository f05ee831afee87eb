-- Tessera gateway, REST body check: refuses a JSON body that names a field its protobuf message does not have.
--
-- The gRPC-JSON transcoder drops unknown JSON fields silently (envoy #46623), so a misspelt field would be
-- ignored instead of reported. This filter runs just before the transcoder, finds the http rule of the request
-- (method + path template), reads the body with a small JSON reader and compares every object key, at every
-- depth, with the fields of the message at that place. Syntax errors are left to the transcoder, which reports
-- them. The generator prepends the tables this code reads:
--   RULES     list of {method, pattern (Lua pattern of the path), message (body type), prefix (field path)}
--   MESSAGES  [message name] = {[json key] = kind}; a kind is "" (scalar or enum), "*" (any JSON),
--             "m:<message>", "a:<kind>" (repeated) or "o:<kind>" (map values)
--   DOMAIN    ErrorInfo domain of the gateway's errors

local byte, sub, find, concat = string.byte, string.sub, string.find, table.concat
local MAX_VIOLATIONS = 20
local SYNTAX = {}
local ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

local function utf8_char(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then return string.char(0xC0 + math.floor(cp / 0x40), 0x80 + cp % 0x40) end
  return string.char(0xE0 + math.floor(cp / 0x1000), 0x80 + math.floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", byte(c))
  end) .. '"'
end

-- Returns the list of unknown field paths in text, or nil when text is not JSON this reader understands.
local function unknown_fields(text, root, prefix)
  local pos, len = 1, #text
  local found = {}

  local function fail() error(SYNTAX, 0) end

  local function skip_ws()
    pos = find(text, "[^ \t\r\n]", pos) or (len + 1)
  end

  local function read_string()
    local parts, i = {}, pos + 1
    while true do
      local j = find(text, '["\\]', i)
      if not j then fail() end
      parts[#parts + 1] = sub(text, i, j - 1)
      if byte(text, j) == 34 then
        pos = j + 1
        return concat(parts)
      end
      local c = sub(text, j + 1, j + 1)
      if c == "u" then
        local hex = sub(text, j + 2, j + 5)
        if not find(hex, "^%x%x%x%x$") then fail() end
        parts[#parts + 1] = utf8_char(tonumber(hex, 16))
        i = j + 6
      else
        local e = ESCAPES[c]
        if not e then fail() end
        parts[#parts + 1] = e
        i = j + 2
      end
    end
  end

  local function join(path, key)
    if path == "" then return key end
    return path .. "." .. key
  end

  local value

  -- kind: "m:<message>" checks keys, "o:<kind>" checks map values, anything else reads without checking.
  local function object(kind, path)
    pos = pos + 1
    skip_ws()
    if byte(text, pos) == 125 then
      pos = pos + 1
      return
    end
    local fields, map_kind = nil, nil
    if sub(kind, 1, 2) == "m:" then
      fields = MESSAGES[sub(kind, 3)]
    elseif sub(kind, 1, 2) == "o:" then
      map_kind = sub(kind, 3)
    end
    while true do
      skip_ws()
      if byte(text, pos) ~= 34 then fail() end
      local key = read_string()
      skip_ws()
      if byte(text, pos) ~= 58 then fail() end
      pos = pos + 1
      local child = "*"
      if fields ~= nil then
        child = fields[key]
        if child == nil then
          if #found < MAX_VIOLATIONS then found[#found + 1] = join(path, key) end
          child = "*"
        end
      elseif map_kind ~= nil then
        child = map_kind
      end
      value(child, join(path, key))
      skip_ws()
      local c = byte(text, pos)
      if c == 44 then
        pos = pos + 1
      elseif c == 125 then
        pos = pos + 1
        return
      else
        fail()
      end
    end
  end

  local function array(kind, path)
    pos = pos + 1
    skip_ws()
    if byte(text, pos) == 93 then
      pos = pos + 1
      return
    end
    local element = "*"
    if sub(kind, 1, 2) == "a:" then element = sub(kind, 3) end
    local index = 0
    while true do
      value(element, path .. "[" .. index .. "]")
      index = index + 1
      skip_ws()
      local c = byte(text, pos)
      if c == 44 then
        pos = pos + 1
      elseif c == 93 then
        pos = pos + 1
        return
      else
        fail()
      end
    end
  end

  value = function(kind, path)
    skip_ws()
    local c = byte(text, pos)
    if c == 123 then
      object(kind, path)
    elseif c == 91 then
      array(kind, path)
    elseif c == 34 then
      read_string()
    elseif sub(text, pos, pos + 3) == "true" or sub(text, pos, pos + 3) == "null" then
      pos = pos + 4
    elseif sub(text, pos, pos + 4) == "false" then
      pos = pos + 5
    else
      local _, e = find(text, "^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
      if not e then fail() end
      pos = e + 1
    end
  end

  local ok, err = pcall(function()
    value("m:" .. root, prefix)
    skip_ws()
    if pos <= len then fail() end
  end)
  if not ok then
    if err == SYNTAX then return nil end
    error(err, 0)
  end
  return found
end

-- gRPC as Envoy and the transcoder tell it: application/grpc, or application/grpc+<codec> or ;<parameters>. Any
-- other type (application/grpc-web, ...) is transcoded as REST, so it is REST here too.
local function is_grpc(content_type)
  return sub(content_type, 1, 16) == "application/grpc" and find(sub(content_type, 17, 17), "^[+;]?$") ~= nil
end

local function find_rule(method, path)
  local q = find(path, "?", 1, true)
  if q then path = sub(path, 1, q - 1) end
  for _, rule in ipairs(RULES) do
    if rule.method == method and find(path, rule.pattern) then return rule end
  end
  return nil
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local content_type = headers:get("content-type") or ""
  if is_grpc(content_type) then return end
  local rule = find_rule(headers:get(":method"), headers:get(":path") or "")
  if rule == nil then return end
  local request_id = headers:get("x-request-id") or ""
  local body = handle:body()
  if body == nil or body:length() == 0 then return end
  local unknown = unknown_fields(body:getBytes(0, body:length()), rule.message, rule.prefix)
  if unknown == nil or #unknown == 0 then return end
  local violations, names = {}, {}
  for i, field in ipairs(unknown) do
    violations[i] = '{"field":' .. json_string(field) .. ',"description":'
      .. json_string("unknown field: the request has no field of this name") .. '}'
    names[i] = field
  end
  local message = "invalid request: unknown field" .. (#names > 1 and "s " or " ") .. concat(names, ", ")
  local payload = '{"code":3,"message":' .. json_string(message) .. ',"details":['
    .. '{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"UNKNOWN_FIELD","domain":'
    .. json_string(DOMAIN) .. ',"metadata":{"request_id":' .. json_string(request_id) .. ',"field":'
    .. json_string(names[1]) .. '}},'
    .. '{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[' .. concat(violations, ",")
    .. ']}]}'
  handle:respond({ [":status"] = "400", ["content-type"] = "application/json" }, payload)
end
