local appended = 0
for i = 1, #V, 7 do
  appended = appended + emit(V[i], V[i + 1], V[i + 2], V[i + 3], V[i + 4], V[i + 5], V[i + 6])
end
return appended
